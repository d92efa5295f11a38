"""The residual-stream precision option of EscQuantizer: which adds carry the stream, the
16-bit grid on the reference target, float on the XNNPACK target, and why it matters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esc_ao import EscQuantizer, QuantConfig, convert, export_model, observe, prepare
from esc_ao.annotators import residual_adds
from esc_ao.report import output_sqnr

aten = torch.ops.aten
_QD = torch.ops.quantized_decomposed


class Block(nn.Module):
    """A pre-LayerNorm block: x + mlp(ln(x))."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(x))))


class Stack(nn.Module):
    """Embedding + positions, two blocks, a final LayerNorm; channel 0 of the stream
    carries a large offset that every LayerNorm scales down, like the outlier channels of
    Whisper's residual stream."""

    def __init__(self, d: int = 16, outlier: float = 300.0) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.zeros(10, d))
        with torch.no_grad():
            self.pos[:, 0] = outlier
        self.blocks = nn.ModuleList(Block(d) for _ in range(2))
        self.ln_post = nn.LayerNorm(d)
        with torch.no_grad():
            for ln in [b.ln for b in self.blocks] + [self.ln_post]:
                ln.weight[0] = 0.01

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


def _batches() -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 10, 8, generator=g),) for _ in range(3)]


def _quantized(residual: str, target: str = "reference") -> tuple[nn.Module, torch.fx.GraphModule, EscQuantizer]:
    torch.manual_seed(0)
    model = Stack().eval()
    quantizer = EscQuantizer(QuantConfig(method="max"), target=target, residual=residual)  # type: ignore[arg-type]
    prepared = prepare(export_model(model, _batches()[0]), quantizer)
    observe(prepared, _batches())
    return model, convert(prepared), quantizer


def _dequant_dtype(node: torch.fx.Node) -> torch.dtype | None:
    return node.args[5] if node.target == _QD.dequantize_per_tensor.default else None


def test_residual_adds_are_the_adds_a_layernorm_reads() -> None:
    gm = export_model(Stack().eval(), _batches()[0])
    adds = residual_adds(gm.graph.nodes)
    # the positional add and one add per block; nothing else in the graph is an add
    assert len(adds) == 3
    assert all(any(u.target == aten.layer_norm.default for u in a.users) for a in adds)


def test_int16_puts_the_stream_on_a_16_bit_grid_and_the_rest_on_int8() -> None:
    _, converted, quantizer = _quantized("int16")
    adds = [n for n in converted.graph.nodes if n.target == aten.add.Tensor]
    norms = [n for n in converted.graph.nodes if n.target == aten.layer_norm.default]
    linears = [n for n in converted.graph.nodes if n.target == aten.linear.default]
    assert adds and norms and linears
    for node in adds:
        assert [_dequant_dtype(a) for a in node.args] == [torch.int16, torch.int16]
    for node in norms:
        assert _dequant_dtype(node.args[0]) == torch.int16
    for node in linears:
        assert _dequant_dtype(node.args[0]) == torch.int8
    assert any("16-bit grid" in r.reason for r in quantizer.records() if r.quantized)


@pytest.mark.parametrize("target", ["xnnpack", "reference"])
def test_float_stream_leaves_the_adds_and_the_layernorm_inputs_float(target: str) -> None:
    _, converted, quantizer = _quantized("float", target=target)
    adds = [n for n in converted.graph.nodes if n.target == aten.add.Tensor]
    assert len(adds) == 3
    for node in adds:
        # float adds, float inputs: on XNNPACK the linears writing the stream run as dynamic
        # int8 GEMMs with float outputs
        assert all(_dequant_dtype(a) is None for a in node.args if isinstance(a, torch.fx.Node))
        assert all(u.target != _QD.quantize_per_tensor.default for u in node.users)
    writers = [r for r in quantizer.records() if "writes the float residual stream" in r.reason]
    assert len(writers) == (3 if target == "xnnpack" else 0)  # embed and both fc2
    for node in converted.graph.nodes:
        if node.target == aten.layer_norm.default:
            assert _dequant_dtype(node.args[0]) is None
    kept = [r for r in quantizer.records() if not r.quantized and "residual stream" in r.reason]
    assert len(kept) == 3


@pytest.mark.parametrize("residual, target", [("int16", "reference"), ("float", "xnnpack"), ("float", "reference")])
def test_wider_stream_beats_int8_on_an_outlier_channel(residual: str, target: str) -> None:
    model, int8, _ = _quantized("int8", target)
    _, wide, _ = _quantized(residual, target)
    held = _batches()[:1]
    # channel 0 at 300 takes the int8 grid's range: the other channels get ~2.4 per step
    assert output_sqnr(model, wide, held) > output_sqnr(model, int8, held) + 10.0


def test_bad_residual_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="residual='float'"):
        EscQuantizer(QuantConfig(), target="xnnpack", residual="int16")
    with pytest.raises(ValueError, match="'int9' is not one of"):
        EscQuantizer(QuantConfig(), residual="int9")  # type: ignore[arg-type]


class Attention(nn.Module):
    """Self-attention over 1500 keys (Whisper's encoder length), half the queries peaked on a few keys (probabilities
    near 1) and half spread evenly: most probabilities lie below one int8 step of the largest,
    as over Whisper's 1500 frames."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        with torch.no_grad():  # scores read input channels 0-1 only, sharply
            for lin in (self.q, self.k):
                lin.weight.zero_()
                lin.bias.zero_()
                lin.weight[0, 0] = lin.weight[1, 1] = 6.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(-1, -2) * 0.25
        return self.out(torch.softmax(scores, dim=-1) @ self.v(x))


def _attention(probs: str) -> tuple[float, torch.fx.GraphModule]:
    torch.manual_seed(0)
    model = Attention().eval()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(1, 1500, 16, generator=g),) for _ in range(3)]
    for (x,) in batches:
        x[:, 750:, :2] = 0.0  # these queries see equal scores: probabilities 1/1500 each
    quantizer = EscQuantizer(QuantConfig(method="mse"), attention_probs=probs)  # type: ignore[arg-type]
    prepared = prepare(export_model(model, batches[0]), quantizer)
    observe(prepared, batches[:2])
    converted = convert(prepared)
    return output_sqnr(model, converted, batches[2:]), converted


def test_int16_attention_probabilities_take_a_16_bit_grid_and_help_long_attention() -> None:
    sqnr8, _ = _attention("int8")
    sqnr16, converted = _attention("int16")
    context = [n for n in converted.graph.nodes if n.target == aten.matmul.default][-1]
    assert _dequant_dtype(context.args[0]) == torch.int16  # the probabilities
    assert _dequant_dtype(context.args[1]) == torch.int8  # the values
    assert sqnr16 > sqnr8 + 6.0  # measured: 13.5 -> 24.7 dB


def test_bad_attention_probability_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="attention_probs='int4'"):
        EscQuantizer(QuantConfig(), attention_probs="int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="XNNPACK has no 16-bit kernels"):
        EscQuantizer(QuantConfig(), target="xnnpack", attention_probs="int16")
