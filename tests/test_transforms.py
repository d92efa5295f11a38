"""Float-exact graph transforms (esc_ao.transforms): smoothing leaves every supported
model's float outputs unchanged, skips what it cannot transform exactly, and helps a
per-tensor grid where one channel dominates."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from esc_ao import EscQuantizer, QuantConfig, convert, export_model, observe, prepare
from esc_ao.report import output_sqnr
from esc_ao.transforms import smooth

sys.path.insert(0, str(Path(__file__).parent))
from test_integration import wav2vec2  # noqa: E402

_TOLERANCE = 1e-5


def _relative_error(model: nn.Module, gm: torch.fx.GraphModule, batch: tuple) -> float:
    with torch.no_grad():
        ref, out = model(*batch), gm(*batch)
    ref, out = (ref[0], out[0]) if isinstance(ref, tuple) else (ref, out)
    return float((out - ref).norm() / ref.norm())


class Mlp(nn.Module):
    """LayerNorm -> two linears (like q/k/v), one LayerNorm channel with a large gain."""

    def __init__(self, gain: float = 40.0, affine: bool = True, tie: bool = False) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(16, elementwise_affine=affine)
        self.a, self.b = nn.Linear(16, 8), nn.Linear(16, 8)
        if tie:
            self.b.weight = self.a.weight
        if affine:
            with torch.no_grad():
                self.ln.weight[3] = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln(x)
        return self.a(y) + self.b(y)


def _exact(model: nn.Module, batches: list[tuple], alpha: float | None = None) -> tuple[float, list]:
    gm = export_model(model.eval(), batches[0])
    records = smooth(gm, batches, alpha=alpha)
    return _relative_error(model, gm, batches[-1]), records


def test_smoothing_is_exact_and_reports_each_layernorm() -> None:
    torch.manual_seed(0)
    batches = [(torch.randn(4, 10, 16),) for _ in range(2)]
    err, records = _exact(Mlp(), batches)
    assert err <= _TOLERANCE
    assert [r.applied for r in records] == [True]
    assert "alpha" in records[0].detail and "2 linear(s)" in records[0].detail


@settings(max_examples=15, deadline=None)
@given(gain=st.floats(0.1, 500.0), alpha=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_any_alpha_keeps_the_float_outputs(gain: float, alpha: float, seed: int) -> None:
    torch.manual_seed(seed)
    batches = [(torch.randn(2, 6, 16) * 3,)]
    err, records = _exact(Mlp(gain), batches, alpha=alpha)
    assert err <= _TOLERANCE
    assert records[0].applied


def test_sites_that_cannot_be_exact_are_skipped_with_the_reason() -> None:
    torch.manual_seed(0)
    batches = [(torch.randn(2, 6, 16),)]
    _, no_affine = _exact(Mlp(affine=False), batches)
    assert not no_affine[0].applied and "without a weight and bias" in no_affine[0].detail
    err, tied = _exact(Mlp(tie=True), batches)
    assert not tied[0].applied and "tied" in tied[0].detail and err == 0.0

    class Residual(Mlp):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.ln(x)
            return y + self.a(y).repeat(1, 1, 2)

    _, read_by_add = _exact(Residual(), batches)
    assert not read_by_add[0].applied and "not only by linear inputs" in read_by_add[0].detail


def test_smoothing_keeps_the_model_it_was_exported_from() -> None:
    torch.manual_seed(0)
    model = Mlp().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _exact(model, [(torch.randn(2, 6, 16),)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_arguments_are_refused() -> None:
    gm = export_model(Mlp().eval(), (torch.randn(1, 4, 16),))
    with pytest.raises(ValueError, match="alpha=1.5"):
        smooth(gm, [(torch.randn(1, 4, 16),)], alpha=1.5)
    with pytest.raises(ValueError, match="at least one calibration batch"):
        smooth(gm, [])


def test_smoothing_raises_the_quantized_sqnr_of_a_dominant_channel() -> None:
    torch.manual_seed(0)
    model = Mlp(gain=200.0).eval()
    batches = [(torch.randn(4, 10, 16),) for _ in range(3)]

    def sqnr(transform: bool) -> float:
        gm = export_model(model, batches[0])
        if transform:
            smooth(gm, batches)
        prepared = prepare(gm, EscQuantizer(QuantConfig(method="mse")))
        observe(prepared, batches)
        return output_sqnr(model, convert(prepared), batches[-1:])

    assert sqnr(True) > sqnr(False) + 3.0


def _trained(name: str) -> tuple[nn.Module, list[tuple]]:
    from esc_ao.speech.pretrained import load_trained

    trained = load_trained(name)
    torch.manual_seed(0)
    shape = (1, trained.frames or 200, trained.n_mels)
    return trained.model.eval(), [(torch.randn(*shape),) for _ in range(2)]


def _whisper(name: str) -> tuple[nn.Module, list[tuple]]:
    from esc_ao.speech import WhisperEncoder, bundled_clips, load_whisper, whisper_mel

    clips = bundled_clips("calibration")[:2]
    return WhisperEncoder(load_whisper(name)).eval(), [(whisper_mel(c.audio),) for c in clips]


SHIPPED_MODELS = ["conformer-ctc", "ast", "wav2vec2", "whisper-tiny.en", "whisper-base"]


def shipped_model(name: str) -> tuple[nn.Module, list[tuple]]:
    """One of SHIPPED_MODELS in eval mode with two input batches."""
    if name.startswith("whisper-"):
        return _whisper(name.removeprefix("whisper-"))
    if name == "wav2vec2":
        return wav2vec2()
    return _trained(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_smoothing_is_exact_on_every_supported_model(name: str) -> None:
    model, batches = shipped_model(name)
    err, records = _exact(model, batches)
    assert err <= _TOLERANCE, f"{name}: relative error {err:.2e}"
    if name != "wav2vec2":  # its post-LayerNorm blocks feed the residual add: skipped, said so
        assert any(r.applied for r in records)
    assert all(r.detail for r in records)


def _gptq_setup() -> tuple[nn.Module, list[tuple]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16)).eval()
    mix = torch.randn(32, 32)  # correlated input channels: where GPTQ's error spreading pays
    return model, [(torch.randn(1, 40, 32) @ mix * 0.3,) for _ in range(6)]


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_weights_lie_on_the_grid_the_observer_finds(bits: int, act_order: bool) -> None:
    from esc_ao.transforms import gptq

    model, batches = _gptq_setup()
    gm = export_model(model, batches[0])
    records = gptq(gm, batches, bits, act_order=act_order)
    assert [r.applied for r in records] == [True, True]
    rounded = {n: p.detach().clone() for n, p in gm.named_parameters() if n.endswith("weight")}
    prepared = prepare(gm, EscQuantizer(QuantConfig(weight_bits=bits, act_bits=8, method="max")))
    observe(prepared, batches)
    converted = convert(prepared)
    dequantized = [n for n in converted.graph.nodes if "dequantize_per_channel" in str(n.target)]
    assert len(dequantized) == 2
    with torch.no_grad():
        for dq, want in zip(dequantized, rounded.values()):
            got = dq.target(*[converted.get_buffer(a.target) if isinstance(a, torch.fx.Node) else a for a in dq.args])
            # convert's integers are GPTQ's: dequantized weights equal the rounded ones
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_gptq_beats_round_to_nearest_at_4_bits_and_says_by_how_much() -> None:
    from esc_ao.transforms import gptq

    model, batches = _gptq_setup()

    def sqnr(transform: bool, act_order: bool = False) -> float:
        gm = export_model(model, batches[0])
        if transform:
            records = gptq(gm, batches, 4, act_order=act_order)
            assert all("of round-to-nearest" in r.detail for r in records)
            assert all(("act-order" in r.detail) == act_order for r in records)
        prepared = prepare(gm, EscQuantizer(QuantConfig(weight_bits=4, act_bits=8, method="mse")))
        observe(prepared, batches)
        return output_sqnr(model, convert(prepared), batches)

    rtn = sqnr(False)
    assert sqnr(True) > rtn + 1.0
    assert sqnr(True, act_order=True) > rtn + 1.0


def test_gptq_skips_tied_weights_and_needs_data() -> None:
    from esc_ao.transforms import gptq

    torch.manual_seed(0)
    batches = [(torch.randn(2, 6, 16),)]
    gm = export_model(Mlp(tie=True).eval(), batches[0])
    records = gptq(gm, batches, 4)
    assert [r.applied for r in records] == [False, False] and all("tied" in r.detail for r in records)
    with pytest.raises(ValueError, match="at least one calibration batch"):
        gptq(gm, [], 4)


@pytest.mark.parametrize("transform", ["smooth", "gptq"])
def test_non_finite_calibration_data_is_refused_naming_the_node(transform: str) -> None:
    from esc_ao.observers import NonFiniteActivationError
    from esc_ao.transforms import gptq

    gm = export_model(Mlp().eval(), (torch.randn(1, 4, 16),))
    bad = [(torch.full((1, 4, 16), float("nan")),)]
    with pytest.raises(NonFiniteActivationError, match=f"{transform}: .*NaN or Inf at the (output|input) of"):
        smooth(gm, bad) if transform == "smooth" else gptq(gm, bad, 4)
