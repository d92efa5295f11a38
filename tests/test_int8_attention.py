"""Attention matmuls as XNNPACK's static int8 batch matmul (EscQuantizer's ``attention``,
recipe flags +qk8/+att8): what gets annotated, the lowering pass that makes each integer
bmm read dequantize nodes and write a quantize node, and the program XNNPACK runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from esc_ao import EscQuantizer, QuantConfig, convert, export_model, observe, prepare
from esc_ao.recipe import split_method

aten = torch.ops.aten


class Attention(nn.Module):
    """Self-attention written as Whisper writes it: 4-D matmuls around a softmax."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        scores = q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5
        ctx = scores.softmax(dim=-1) @ v
        return self.out(ctx.transpose(1, 2).reshape(b, t, d)) + x


def _model() -> tuple[nn.Module, tuple[torch.Tensor, ...], list[tuple[torch.Tensor, ...]]]:
    torch.manual_seed(0)
    model = Attention().eval()
    batches = [(torch.randn(1, 24, 32),) for _ in range(3)]
    return model, batches[0], batches


def _matmul_records(attention: str) -> list[tuple[bool, str]]:
    model, example, _ = _model()
    quantizer = EscQuantizer(QuantConfig(method="max"), target="xnnpack", attention=attention)  # type: ignore[arg-type]
    prepare(export_model(model, example), quantizer)
    return [(r.quantized, r.reason) for r in quantizer.records() if "matmul" in r.op]


def test_scores_only_quantizes_the_matmul_not_reading_the_softmax() -> None:
    assert [q for q, _ in _matmul_records("float")] == [False, False]
    scores = _matmul_records("scores")
    assert [q for q, _ in scores] == [True, False]
    assert "int8 batch matmul" in scores[0][1]
    assert [q for q, _ in _matmul_records("int8")] == [True, True]


def test_bad_attention_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="attention='fast'"):
        EscQuantizer(QuantConfig(), target="xnnpack", attention="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="target='reference'"):
        EscQuantizer(QuantConfig(), target="reference", attention="scores")
    with pytest.raises(ValueError, match=r"\+xnn"):
        split_method("mse+qk8")
    with pytest.raises(ValueError, match="one attention flag"):
        split_method("mse+xnn+qk8+att8")
    assert split_method("mse+xnn+rf+qk8+sq")[1].attention == "scores"
    assert split_method("mse+xnn+att8")[1].suffix == "+xnn+att8"


def _converted(attention: str, symmetric: bool = True) -> tuple[nn.Module, torch.fx.GraphModule, tuple]:
    model, example, batches = _model()
    config = QuantConfig(method="mse", act_symmetric=symmetric)
    quantizer = EscQuantizer(config, target="xnnpack", attention=attention)  # type: ignore[arg-type]
    prepared = prepare(export_model(model, example), quantizer)
    observe(prepared, batches)
    return model, convert(prepared), example


def test_requantized_views_change_no_value_and_face_each_integer_bmm() -> None:
    from esc_ao.lower.passes import matmul_to_bmm, requantize_bmm_views

    _, graph, example = _converted("int8")
    want = graph(*example)
    assert matmul_to_bmm(graph) == 2
    assert requantize_bmm_views(graph) > 0
    torch.testing.assert_close(graph(*example), want, rtol=0, atol=0)
    q = torch.ops.quantized_decomposed.quantize_per_tensor.default
    dq = torch.ops.quantized_decomposed.dequantize_per_tensor.default
    bmms = [n for n in graph.graph.nodes if n.target == aten.bmm.default]
    assert len(bmms) == 2
    for bmm in bmms:
        assert all(a.target == dq for a in bmm.args[:2])
        assert [u.target for u in bmm.users] == [q]
    assert requantize_bmm_views(graph) == 0  # nothing left to do: the pass is idempotent


def _bmms(calls: dict[str, int], kind: str) -> int:
    """XNNPACK batch matmuls of one kind ("QS8": static int8, "F32") in a profile."""
    return sum(n for k, n in calls.items() if k.startswith(f"Batch Matrix Multiply (NC, {kind})"))


@pytest.mark.slow
@pytest.mark.parametrize(("attention", "int8_bmms"), [("float", 0), ("scores", 1), ("int8", 2)])
def test_xnnpack_runs_the_integer_bmms(tmp_path, attention: str, int8_bmms: int) -> None:
    from esc_ao.bench.op_profile import profile_pte
    from esc_ao.lower import to_executorch

    model, graph, example = _converted(attention)
    result = to_executorch(graph, example, tmp_path / "a.pte", reference=model)
    assert result.sqnr_db > 30  # the program computes the graph it came from
    assert result.coverage.integer.get("bmm", 0) == int8_bmms
    calls = profile_pte(result.path, example, runs=1).calls
    assert _bmms(calls, "QS8") == int8_bmms
    assert _bmms(calls, "F32") == 2 - int8_bmms


@pytest.mark.slow
def test_an_affine_second_operand_keeps_the_float_kernel_and_loads(tmp_path) -> None:
    from esc_ao.bench.op_profile import profile_pte
    from esc_ao.lower import to_executorch

    model, graph, example = _converted("int8", symmetric=False)
    zero_points = [n.args[2] for n in graph.graph.nodes if "dequantize_per_tensor" in str(n.target)]
    assert any(z != 0 for z in zero_points)
    result = to_executorch(graph, example, tmp_path / "a.pte", reference=model)
    calls = profile_pte(result.path, example, runs=1).calls
    assert _bmms(calls, "QS8") < 2  # XNNPACK refuses those: fp32 path


def test_recipe_passes_attention_to_the_quantizer() -> None:
    _, recipe = split_method("mse+xnn+rf+qk8")
    assert recipe.quantizer(QuantConfig()).attention == "scores"
    assert dataclasses.replace(recipe, attention="float").suffix == "+xnn+rf"
