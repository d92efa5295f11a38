"""Mixed precision plans (esc_ao.precision): groups ranked by what they cost the
objective per multiply-accumulate, within the budget, applied as overrides."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from esc_ao import EscQuantizer, QuantConfig, convert, export_model, observe, prepare
from esc_ao.precision import plan_precision
from esc_ao.recipe import Recipe
from esc_ao.report import output_sqnr

W4A4 = QuantConfig(weight_bits=4, act_bits=4, method="mse")


class Net(nn.Module):
    """Three linears; the second reads a tensor with one huge channel (which it ignores), so
    on a per-tensor grid its other input channels get no levels while the others survive."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)
        with torch.no_grad():
            self.a.bias[3] = 300.0
            self.b.weight[:, 3] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _setup() -> tuple[nn.Module, list[tuple[torch.Tensor]], torch.fx.GraphModule]:
    torch.manual_seed(0)
    model = Net().eval()
    batches = [(torch.randn(4, 16),) for _ in range(4)]
    prepared = prepare(export_model(model, batches[0]), EscQuantizer(W4A4))
    observe(prepared, batches)
    return model, batches, prepared


def test_the_most_sensitive_group_is_raised_first_within_the_budget() -> None:
    _, batches, prepared = _setup()
    plan = plan_precision(prepared, batches, budget=0.6)
    assert plan.raised and plan.raised[0].modules == ("b",)  # 57 % of the MACs: fits 0.6
    assert plan.raised_macs <= 0.6 * plan.total_macs
    # at 0.5 it does not fit: the next best group that does is taken instead
    assert ("b",) not in [g.modules for g in plan_precision(prepared, batches, budget=0.5).raised]
    assert plan.total_macs == 4 * (16 * 32 + 32 * 32 + 32 * 8)
    assert {g.modules for g in plan.candidates} == {("a",), ("b",), ("c",)}
    assert all(g.objective < plan.baseline_objective for g in plan.raised)
    assert "raised 1 of 3 groups" in plan.summary() or "raised 2 of 3 groups" in plan.summary()


def test_applying_the_plan_raises_accuracy() -> None:
    model, batches, prepared = _setup()
    plan = plan_precision(prepared, batches, budget=0.6)
    before = output_sqnr(model, convert(copy.deepcopy(prepared)), batches)
    quantizer = plan.apply(EscQuantizer(W4A4), QuantConfig(method="mse"))
    raised = prepare(export_model(model, batches[0]), quantizer)
    observe(raised, batches)
    assert output_sqnr(model, convert(raised), batches) > before + 4.0  # measured: 6.1 -> 11.4 dB
    assert next(r for r in quantizer.records() if r.module == "b").config == "w8a8"


def test_budgets_outside_what_can_be_met_say_the_smallest_feasible_one() -> None:
    _, batches, prepared = _setup()
    assert plan_precision(prepared, batches, budget=0.0).raised == ()
    with pytest.raises(ValueError, match=r"smallest feasible budget is 0\.\d+"):
        plan_precision(prepared, batches, budget=0.01)
    with pytest.raises(ValueError, match="budget=1.5 must be a fraction"):
        plan_precision(prepared, batches, budget=1.5)
    with pytest.raises(ValueError, match="precision_budget=0 must lie in"):
        Recipe(precision_budget=0)


def test_recipe_prepares_again_under_the_plan() -> None:
    model, batches, _ = _setup()
    ready = Recipe(precision_budget=0.6).prepare(export_model(model, batches[0]), batches, W4A4)
    assert ready.plan is not None and ready.plan.raised[0].modules == ("b",)
    assert next(r for r in ready.quantizer.records() if r.module == "b").config == "w8a8"
    assert Recipe().prepare(export_model(model, batches[0]), batches, W4A4).plan is None
