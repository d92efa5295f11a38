"""Property tests of the activation and weight observers; each test names its invariant."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from esc_ao.histogram import SignedHistogram, quantization_mse
from esc_ao.observers import (
    ActivationObserver,
    EntropyObserver,
    EscObserver,
    MaxObserver,
    MSEObserver,
    NonFiniteActivationError,
    PercentileObserver,
    PerChannelWeightObserver,
    fake_quantize,
    qrange,
)

ACT_OBSERVERS = [MaxObserver, PercentileObserver, EntropyObserver, MSEObserver, EscObserver]
BINS = 256  # small histograms keep hypothesis fast; the invariants do not depend on N

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)
tensors = arrays(np.float32, st.integers(1, 300), elements=finite).map(torch.from_numpy)
special = st.sampled_from([torch.zeros(17), torch.full((9,), 3.25), torch.full((4,), -1e-3), torch.tensor([0.0])])
any_tensor = st.one_of(tensors, special)


def every_grid(test):  # type: ignore[no-untyped-def]
    """Runs a property test over every observer, both bit widths and both grid kinds."""
    test = given(x=any_tensor)(test)
    test = settings(max_examples=40, deadline=None)(test)
    for name, values in (("symmetric", [True, False]), ("bits", [8, 4]), ("cls", ACT_OBSERVERS)):
        test = pytest.mark.parametrize(name, values)(test)
    return test


def make(cls: type[ActivationObserver], bits: int = 8, symmetric: bool = True) -> ActivationObserver:
    qmin, qmax = qrange(bits)
    scheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    return cls(dtype=torch.int8, qscheme=scheme, quant_min=qmin, quant_max=qmax, histogram_bins=BINS)


@every_grid
def test_scale_is_finite_positive_and_zero_point_in_range(cls, bits, symmetric, x) -> None:
    obs = make(cls, bits, symmetric)
    obs(x)
    scale, zp = obs.calculate_qparams()
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert obs.quant_min <= int(zp) <= obs.quant_max


@every_grid
def test_in_range_quantization_error_is_at_most_half_a_step(cls, bits, symmetric, x) -> None:
    obs = make(cls, bits, symmetric)
    obs(x)
    scale, zp = obs.qparams()
    lo, hi = (obs.quant_min - zp) * scale, (obs.quant_max - zp) * scale
    inside = x[(x >= lo) & (x <= hi)]
    err = (fake_quantize(inside, scale, zp, obs.quant_min, obs.quant_max) - inside).abs()
    # float32 rounding of x * (1/scale) adds at most a few ulps of the value itself.
    assert bool((err <= scale / 2 + 1e-6 * inside.abs() + 1e-30).all())


@settings(max_examples=60, deadline=None)
@given(x=any_tensor, p=st.floats(min_value=90.0, max_value=100.0))
def test_percentile_threshold_never_exceeds_max(x, p) -> None:
    perc = make(PercentileObserver)
    perc.percentile = p
    mx = make(MaxObserver)
    perc(x), mx(x)
    assert perc.threshold() <= mx.threshold()


def _true_mse(x: torch.Tensor, threshold: float, qmax: int) -> float:
    v = x.abs().double().numpy()
    return float(quantization_mse(v, np.ones_like(v), np.array([max(threshold, 1e-30)]), qmax)[0])


@pytest.mark.parametrize("bits", [8, 4])
@settings(max_examples=60, deadline=None)
@given(x=tensors)
def test_mse_observer_error_is_no_worse_than_max(bits, x) -> None:
    mse_obs, max_obs = make(MSEObserver, bits), make(MaxObserver, bits)
    mse_obs(x), max_obs(x)
    qmax = mse_obs.quant_max
    t_mse, t_max = mse_obs.threshold(), max_obs.threshold()
    if t_max == 0:
        assert t_mse == 0
        return
    # The MSE search evaluates candidates on histogram bin centres, so its pick can only
    # be off by the histogram's resolution: |x| and its bin centre differ by <= w/2, and
    # the quantization error is 1-Lipschitz in x, so each squared error moves by at most
    # (w/2) * (2 e_max + w/2), with e_max bounded by half a step plus the clipped tail.
    w = mse_obs.histogram.bin_width
    e_max = max(t_max / qmax / 2, t_max - t_mse, t_max / qmax) + w
    bound = 2 * (w / 2) * (2 * e_max + w / 2)
    assert _true_mse(x, t_mse, qmax) <= _true_mse(x, t_max, qmax) + bound


@pytest.mark.parametrize("cls", ACT_OBSERVERS)
@settings(max_examples=40, deadline=None)
@given(parts=st.lists(any_tensor, min_size=1, max_size=4))
def test_batches_accumulate_to_the_statistics_of_the_concatenation(cls, parts) -> None:
    streamed, whole = make(cls), make(cls)
    for p in parts:
        streamed(p)
    whole(torch.cat(parts))
    assert streamed.histogram.total == whole.histogram.total
    assert np.array_equal(streamed.histogram.folded()[0], whole.histogram.folded()[0])
    assert streamed.histogram.log2_range == whole.histogram.log2_range
    assert streamed.qparams() == whole.qparams()


@settings(max_examples=60, deadline=None)
@given(x=any_tensor)
def test_histogram_counts_every_value_once(x) -> None:
    h = SignedHistogram(BINS)
    h.update(x)
    assert h.total == x.numel()


def test_all_zero_activation_gets_a_valid_scale() -> None:
    for cls in ACT_OBSERVERS:
        obs = make(cls)
        obs(torch.zeros(100))
        scale, zp = obs.qparams()
        assert math.isfinite(scale) and scale > 0
        assert torch.equal(fake_quantize(torch.zeros(3), scale, zp, -128, 127), torch.zeros(3))


def test_non_negative_tensor_uses_the_whole_grid() -> None:
    obs = make(MaxObserver)
    obs(torch.linspace(0, 1, 1000))
    scale, zp = obs.qparams()
    assert zp == -128 and scale == pytest.approx(1 / 255)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_calibration_data_names_the_tensor(bad: float) -> None:
    obs = make(MSEObserver)
    obs.label = "linear_3 input layer_norm"
    with pytest.raises(NonFiniteActivationError, match="linear_3 input layer_norm"):
        obs(torch.tensor([1.0, bad]))


def test_esc_observer_scale_is_settable_and_resettable() -> None:
    obs = make(EscObserver)
    obs(torch.randn(1000))
    init = obs.init_scale
    assert obs.scale == init
    obs.set_scale(init * 2)
    assert obs.scale == init * 2 and float(obs.calculate_qparams()[0]) == pytest.approx(init * 2)
    obs.set_scale(None)
    assert obs.scale == init
    with pytest.raises(ValueError, match="finite and > 0"):
        obs.set_scale(0.0)


def test_esc_observer_starts_from_the_mse_threshold() -> None:
    x = torch.randn(5000) ** 3
    esc, mse = make(EscObserver), make(MSEObserver)
    esc(x), mse(x)
    assert esc.init_scale == mse.qparams()[0]


@pytest.mark.parametrize("bits", [8, 4])
@settings(max_examples=30, deadline=None)
@given(w=arrays(np.float32, st.tuples(st.integers(1, 8), st.integers(1, 16)), elements=finite).map(torch.from_numpy))
def test_weight_observer_maps_the_largest_weight_onto_the_grid(bits, w) -> None:
    qmin, qmax = qrange(bits, weight=True)
    obs = PerChannelWeightObserver(quant_min=qmin, quant_max=qmax, ch_axis=0)
    obs(w)
    scale, zp = obs.calculate_qparams()
    assert torch.isfinite(scale).all() and (scale > 0).all() and (zp == 0).all()
    obs.observing, obs.fake_quant = False, True
    err = (obs(w) - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-6 * w.abs() + 1e-30).all())  # nothing clipped
