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
