"""esc-ao's Entropy (KL) calibration against an independent reference of TensorRT's
published entropy calibrator.

The reference follows the procedure of "8-bit Inference with TensorRT" (S. Migacz,
GTC 2017, slide "Entropy Calibration - pseudocode") as NVIDIA's pytorch-quantization
implements it (``pytorch_quantization/calib/histogram.py``, ``_compute_amax_entropy``,
default ``stride=1``, ``start_bin=128``):

* a 2048-bin histogram of |x| over [0, max |x|];
* for every candidate i = 128 .. 2048: P = the first i bins with everything beyond bin i
  added to bin i - 1; Q = the same i bins merged into 128 groups (bin j goes to group
  floor(128 j / i)), each group's count spread evenly over its non-empty bins, empty bins
  staying empty; the divergence is KL(P || Q) after normalising both, infinite when P has
  mass where Q has none (a clipped tail landing on an empty bin);
* the threshold is the upper edge of bin i - 1, i.e. i * width, for the i with the
  smallest divergence (the largest such i on ties).

Comparisons allow one histogram bin of the coarser of the two histograms involved. Three
things separate esc-ao's search from the reference, and the tests isolate them:

* binning: esc-ao's mergeable histogram spans [0, R) with R the power of two above
  max |x|, so the data fills between 1024 and 2048 of its 2048 bins, not all of them;
* candidate stride: esc-ao evaluates at most 256 candidates (every 7th bin when the data
  fills all 2048 bins) and the strided grid can miss the last candidate, T = max |x|;
* the divergence of one candidate: esc-ao's ``_clipped_kl`` is checked to agree with the
  reference exactly, so P, Q and the KL itself are not the source of any difference.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from esc_ao.histogram import _clipped_kl, entropy_threshold
from esc_ao.observers import EntropyObserver

N_BINS = 2048
LEVELS = 128  # int8: 127 positive levels plus zero, the sign handled by symmetry
START_BIN = 128
QMAX = 127
N_SAMPLES = 200_000
DISTRIBUTIONS = ["gaussian", "laplace", "gaussian_outliers", "uniform"]


def _samples(name: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if name == "gaussian":
        x = rng.standard_normal(N_SAMPLES)
    elif name == "laplace":
        x = rng.laplace(0.0, 1.0, N_SAMPLES)
    elif name == "gaussian_outliers":
        # 0.01 % of the values at 50x the scale: the shape of speech-model activations
        # with a few very large channels.
        x = rng.standard_normal(N_SAMPLES)
        x[rng.choice(N_SAMPLES, N_SAMPLES // 10_000, replace=False)] *= 50.0
    elif name == "uniform":
        x = rng.uniform(-1.0, 1.0, N_SAMPLES)
    else:
        raise ValueError(name)
    return x.astype(np.float32)


# --- the reference --------------------------------------------------------------------
def reference_histogram(abs_x: np.ndarray) -> tuple[np.ndarray, float]:
    """2048 equal bins of |x| over [0, max |x|] and their width."""
    amax = float(abs_x.max())
    counts, _ = np.histogram(abs_x, bins=N_BINS, range=(0.0, amax))
    return counts.astype(np.float64), amax / N_BINS


def reference_kl(hist: np.ndarray, i: int) -> float:
    """KL(P || Q) of candidate i, written from the published description."""
    kept = hist[:i]
    p = kept.copy()
    p[i - 1] += hist[i:].sum()

    group = (np.arange(i) * LEVELS) // i
    occupied = kept > 0
    group_count = np.zeros(LEVELS)
    group_support = np.zeros(LEVELS)
    np.add.at(group_count, group, kept)
    np.add.at(group_support, group, occupied)
    q = np.zeros(i)
    q[occupied] = group_count[group[occupied]] / group_support[group[occupied]]

    p = p / p.sum()
    q = q / q.sum()
    support = p > 0
    if np.any(q[support] == 0.0):
        return math.inf
    return float(np.sum(p[support] * np.log(p[support] / q[support])))


def reference_search(hist: np.ndarray, width: float) -> tuple[float, dict[int, float]]:
    """Threshold over every candidate up to the last non-empty bin, and the divergences."""
    last = int(np.nonzero(hist)[0][-1]) + 1
    kls = {i: reference_kl(hist, i) for i in range(START_BIN, max(last, START_BIN) + 1)}
    best = min(kls.values())
    best_i = max(i for i, kl in kls.items() if kl == best)
    return best_i * width, kls


@functools.lru_cache(maxsize=None)
def reference(name: str) -> tuple[float, float, np.ndarray, dict[int, float]]:
    """(threshold, bin width, histogram, divergences) of TensorRT's calibrator on the data."""
    hist, width = reference_histogram(np.abs(_samples(name)))
    threshold, kls = reference_search(hist, width)
    return threshold, width, hist, kls


@functools.lru_cache(maxsize=None)
def observed(name: str) -> tuple[float, np.ndarray, float]:
    """(threshold, folded |x| histogram, bin width) of esc-ao's EntropyObserver on the data."""
    obs = EntropyObserver(quant_min=-128, quant_max=QMAX)
    obs(torch.from_numpy(_samples(name)))
    folded, width = obs.histogram.folded()
    return obs.threshold(), folded, width


# --- self-checks of the reference ------------------------------------------------------
def test_reference_keeps_the_full_range_of_a_uniform_tensor() -> None:
    # Nothing is gained by clipping a flat distribution: the last candidate, T = max |x|, wins.
    threshold, width, _, _ = reference("uniform")
    amax = float(np.abs(_samples("uniform")).max())
    assert threshold == pytest.approx(amax, abs=width * 1e-6)


def test_reference_clips_a_gaussian_in_the_published_range() -> None:
    # TensorRT's calibrator clips N(0, 1) at a few sigma, below the sample maximum.
    threshold, _, _, _ = reference("gaussian")
    amax = float(np.abs(_samples("gaussian")).max())
    assert 3.0 < threshold < amax


def test_reference_kl_is_zero_when_every_bin_is_a_level() -> None:
    # With i == 128 each bin is its own group: Q == P, so the divergence vanishes.
    hist = np.arange(1.0, 201.0)
    hist[128:] = 0.0
    assert reference_kl(hist, 128) == pytest.approx(0.0, abs=1e-15)


# --- esc-ao against the reference ------------------------------------------------------
@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_candidate_divergence_matches_reference(name: str) -> None:
    """On the same histogram, esc-ao's KL of every candidate equals the reference's."""
    _, _, hist, kls = reference(name)
    finite = [i for i, kl in kls.items() if math.isfinite(kl)]
    assert finite, "the reference has at least one admissible candidate"
    min_finite = min(kls[i] for i in finite)
    for i, kl in kls.items():
        mine = _clipped_kl(hist, i, LEVELS)
        if math.isfinite(kl):
            assert mine == pytest.approx(kl, rel=1e-9, abs=1e-15), f"candidate {i}"
        else:
            # esc-ao floors Q instead of returning infinity; such a candidate must still
            # lose to every admissible one.
            assert mine > min_finite, f"candidate {i}: inadmissible but KL {mine} <= {min_finite}"


SEARCH_DEVIATION = (
    "candidate stride: esc-ao evaluates at most 256 candidates (every 7th bin on a "
    "full 2048-bin histogram) and misses the reference's optimum"
)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            "gaussian", marks=pytest.mark.xfail(strict=True, reason=SEARCH_DEVIATION + ": 4.145 vs 4.268 (-53 bins)")
        ),
        pytest.param(
            "laplace", marks=pytest.mark.xfail(strict=True, reason=SEARCH_DEVIATION + ": 10.209 vs 10.038 (+26 bins)")
        ),
        pytest.param(
            "gaussian_outliers",
            marks=pytest.mark.xfail(strict=True, reason=SEARCH_DEVIATION + ": 8.596 vs 7.615 (+17 bins)"),
        ),
        pytest.param(
            "uniform",
            marks=pytest.mark.xfail(
                strict=True,
                reason=SEARCH_DEVIATION + ": the grid stops at bin 2046 of 2048, " "0.99902 vs 1.0 (-2 bins)",
            ),
        ),
    ],
)
def test_search_on_reference_histogram_matches_reference(name: str) -> None:
    """esc-ao's entropy_threshold, given TensorRT's own histogram, picks its threshold."""
    expected, width, hist, _ = reference(name)
    amax = float(np.abs(_samples(name)).max())
    got = entropy_threshold(hist, width, amax, QMAX)
    assert abs(got - expected) <= width, f"esc-ao {got:.5f} vs reference {expected:.5f}"


BINNING_DEVIATION = (
    "binning: esc-ao's histogram spans the power of two above max |x|, so the data fills "
    "fewer than 2048 bins and the divergence minimum moves"
)


@pytest.mark.parametrize(
    "name",
    [
        "gaussian",
        pytest.param(
            "laplace", marks=pytest.mark.xfail(strict=True, reason=BINNING_DEVIATION + " (1728 bins): 11.469 vs 10.038")
        ),
        pytest.param(
            "gaussian_outliers",
            marks=pytest.mark.xfail(strict=True, reason=BINNING_DEVIATION + " (1891 bins): 14.188 vs 7.615"),
        ),
        "uniform",
    ],
)
def test_reference_search_on_observer_histogram_matches_reference(name: str) -> None:
    """The published search run on EntropyObserver's folded histogram (every candidate)
    gives the threshold it gives on TensorRT's histogram."""
    expected, ref_width, _, _ = reference(name)
    _, folded, width = observed(name)
    got, _ = reference_search(folded, width)
    assert abs(got - expected) <= max(width, ref_width), f"{got:.5f} vs reference {expected:.5f}"


END_TO_END_DEVIATION = "binning and candidate stride together"


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            "gaussian",
            marks=pytest.mark.xfail(strict=True, reason=END_TO_END_DEVIATION + ": 4.141 vs 4.268 (-55 bins, -3 %)"),
        ),
        pytest.param(
            "laplace",
            marks=pytest.mark.xfail(strict=True, reason=END_TO_END_DEVIATION + ": 10.750 vs 10.038 (+108 bins, +7 %)"),
        ),
        pytest.param(
            "gaussian_outliers",
            marks=pytest.mark.xfail(strict=True, reason=END_TO_END_DEVIATION + ": 23.000 vs 7.615 (+267 bins, 3x)"),
        ),
        pytest.param(
            "uniform", marks=pytest.mark.xfail(strict=True, reason=END_TO_END_DEVIATION + ": 0.99902 vs 1.0 (-2 bins)")
        ),
    ],
)
def test_entropy_observer_matches_reference(name: str) -> None:
    """EntropyObserver fed the data agrees with TensorRT's calibrator within one bin."""
    expected, ref_width, _, _ = reference(name)
    got, _, width = observed(name)
    assert abs(got - expected) <= max(width, ref_width), f"esc-ao {got:.5f} vs reference {expected:.5f}"
