"""The annotation policy table (esc_ao.annotators.POLICY) is what the converted graph holds:
for every target and role, a one-op model gets quantize/dequantize pairs on its tensor
inputs and on its output exactly where the table says, and the report says what the
table says."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from esc_ao import EscQuantizer, QuantConfig, convert, export_model, observe, prepare
from esc_ao.annotators import POLICY, TARGETS
from esc_ao.pipeline import CalibrationDataError

aten = torch.ops.aten
_Q = torch.ops.quantized_decomposed.quantize_per_tensor.default


class OneOp(nn.Module):
    """Two inputs, one op of the role, then a float op (so the op's output is not a graph
    output, which the XNNPACK target keeps float whatever the role)."""

    def __init__(self, op: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.op = op
        self.linear = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.op(self, a, b))


ROLE_OPS: dict[str, tuple[Callable[..., torch.Tensor], object, int]] = {
    # role: (the op, its aten target, how many tensor inputs are activations)
    "weighted": (lambda m, a, b: m.linear(a), aten.linear.default, 1),
    "binary": (lambda m, a, b: a + b, aten.add.Tensor, 2),
    "matmul": (lambda m, a, b: a @ b.transpose(-1, -2), aten.matmul.default, 2),
    "norm": (lambda m, a, b: m.norm(a), aten.layer_norm.default, 1),
}


def test_the_table_covers_every_target_and_role() -> None:
    assert set(POLICY) == {(t, r) for t in TARGETS for r in ROLE_OPS}


@pytest.mark.parametrize("target, role", sorted(POLICY))
def test_the_converted_graph_follows_the_table(target: str, role: str) -> None:
    policy = POLICY[(target, role)]
    op, aten_target, n_inputs = ROLE_OPS[role]
    torch.manual_seed(0)
    model = OneOp(op).eval()
    batches = [(torch.randn(2, 4, 8), torch.randn(2, 4, 8)) for _ in range(2)]
    quantizer = EscQuantizer(QuantConfig(method="max"), target=target)  # type: ignore[arg-type]
    prepared = prepare(export_model(model, batches[0]), quantizer)
    (record,) = [r for r in quantizer.records() if r.op == str(aten_target)]
    assert record.quantized == (policy.skip is None)
    assert (policy.report if policy.skip is None else policy.skip) in record.reason
    if policy.skip is not None:  # nothing in the model is quantized: nothing to observe
        with pytest.raises(CalibrationDataError, match="no observers"):
            observe(prepared, batches)
        return
    observe(prepared, batches)
    graph = convert(prepared).graph
    (node,) = [n for n in graph.nodes if n.target == aten_target]
    # each quantized activation input arrives through quantize -> dequantize
    quantized_inputs = [
        a for a in node.args[:2] if isinstance(a, torch.fx.Node) and "dequantize_per_tensor" in str(a.target)
    ]
    assert len(quantized_inputs) == (n_inputs if policy.inputs else 0)
    assert any(u.target == _Q for u in node.users) == policy.output
