"""Mixed precision as a plan: which layers leave the low-bit grid, chosen by what each one
costs the objective, under a budget of multiply-accumulates.

Candidates are the groups of weighted ops (linear, conv) that read one activation tensor:
they share its observer, so they move together (a block's query, key and value linears
read one LayerNorm output). A group's sensitivity is the objective's drop when it alone
computes in float, measured on the prepared model with fake quantization switched off
for its input's observer and its weights' observers (one forward pass per group and
batch; nothing is re-calibrated). Groups are taken in order of drop per multiply-
accumulate until the budget, a fraction of all the weighted ops' multiply-accumulates, is
spent. The plan is applied as module-name overrides of EscQuantizer (``apply``): float,
or a wider QuantConfig such as W8A8 under a W4A4 global config.

The float sensitivity is a proxy for "raised to W8A8": both remove most of the group's
error, and float needs no second calibration.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch.fx import GraphModule, Node

from esc_ao.annotators import OP_ROLES
from esc_ao.config import QuantConfig
from esc_ao.observers import iter_observers, observer_mode
from esc_ao.pipeline import Batch
from esc_ao.quantizer import EscQuantizer
from esc_ao.search.objectives import Objective, OutputMSE

__all__ = ["LayerGroup", "PrecisionPlan", "plan_precision"]


@dataclass(frozen=True)
class LayerGroup:
    """Weighted ops reading one activation tensor: their modules, their multiply-
    accumulates per call, and the objective with this group float (lower is better)."""

    tensor: str
    modules: tuple[str, ...]
    macs: int
    objective: float


@dataclass(frozen=True)
class PrecisionPlan:
    """The groups raised, what they cost, and every candidate measured."""

    budget: float
    raised: tuple[LayerGroup, ...]
    candidates: tuple[LayerGroup, ...]
    total_macs: int
    baseline_objective: float

    @property
    def raised_macs(self) -> int:
        return sum(g.macs for g in self.raised)

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(m for g in self.raised for m in g.modules)

    def apply(self, quantizer: EscQuantizer, higher: QuantConfig | None = None) -> EscQuantizer:
        """Sets every raised module to ``higher`` (None: float) on ``quantizer``."""
        for module in self.modules:
            quantizer.set_module_name(module, higher)
        return quantizer

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "raised_macs": self.raised_macs,
            "total_macs": self.total_macs,
            "baseline_objective": self.baseline_objective,
            "raised": [asdict(g) for g in self.raised],
            "candidates": [asdict(g) for g in self.candidates],
        }

    def summary(self) -> str:
        share = self.raised_macs / max(self.total_macs, 1)
        names = (
            ", ".join(g.modules[0] + (f" (+{len(g.modules) - 1})" if len(g.modules) > 1 else "") for g in self.raised)
            or "nothing"
        )
        return (
            f"raised {len(self.raised)} of {len(self.candidates)} groups, {100 * share:.1f} % of "
            f"multiply-accumulates (budget {100 * self.budget:.1f} %): {names}"
        )


def _macs(node: Node) -> int:
    """Multiply-accumulates of one weighted op (linear or conv) per call."""
    out = node.meta.get("val")
    w_node = node.args[1]
    while isinstance(w_node, Node) and w_node.op == "call_module":  # through the weight's observer
        w_node = w_node.args[0]
    w = w_node.meta.get("val") if isinstance(w_node, Node) else None
    if not isinstance(out, torch.Tensor) or not isinstance(w, torch.Tensor):
        return 0
    # linear: out (..., N) with weight (N, K); conv: out (B, C_out, ...) with weight
    # (C_out, C_in / groups, k...): each output element costs the weight's fan-in.
    return int(out.numel() * w[0].numel())


def _groups(prepared: GraphModule, observers: dict[str, Any]) -> dict[str, tuple[list[str], list[str], int]]:
    """Input observer name -> (module names, weight observer names, multiply-accumulates)."""
    groups: dict[str, tuple[list[str], list[str], int]] = {}
    for node in prepared.graph.nodes:
        if node.op != "call_function" or OP_ROLES.get(node.target) != "weighted":
            continue
        x, w = node.args[0], node.args[1]
        if not (
            isinstance(x, Node)
            and x.op == "call_module"
            and str(x.target) in observers
            and isinstance(w, Node)
            and w.op == "call_module"
            and str(w.target) in observers
        ):
            continue  # not quantized (kept float) or dynamic (its input has no esc_ao observer)
        stack = node.meta.get("nn_module_stack") or {}
        module = str(list(stack.values())[-1][0]) if stack else node.name
        mods, wobs, macs = groups.setdefault(str(x.target), ([], [], 0))
        mods.append(module)
        wobs.append(str(w.target))
        groups[str(x.target)] = (mods, wobs, macs + _macs(node))
    return groups


@torch.no_grad()
def plan_precision(
    prepared: GraphModule, batches: Sequence[Batch], budget: float, objective: Objective | None = None
) -> PrecisionPlan:
    """Measures every group's sensitivity on ``batches`` (an observed prepared model) and
    raises groups, most objective per multiply-accumulate first, within ``budget`` (a
    fraction of the weighted ops' multiply-accumulates in [0, 1]).

    Raises:
        ValueError: a budget outside [0, 1]; a budget below the cheapest group's share
            that is not 0 (the message names the smallest feasible budget).
    """
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget={budget!r} must be a fraction of the multiply-accumulates in [0, 1], e.g. 0.05")
    objective = objective or OutputMSE(all_outputs=True)
    observers = dict(iter_observers(prepared))
    groups = _groups(prepared, observers)
    if not groups:
        raise ValueError(
            "the prepared model has no quantized linear or conv to plan: prepare it with a quantizer "
            "that annotates weighted ops, and observe it, first"
        )
    batches = list(batches)
    with observer_mode(prepared, observing=False, fake_quant=False):
        references = [prepared(*b) for b in batches]
    with observer_mode(prepared, observing=False, fake_quant=True):
        baseline = objective([prepared(*b) for b in batches], references)
        measured = []
        for tensor, (modules, weights, macs) in groups.items():
            switched = [observers[tensor]] + [observers[w] for w in weights]
            for obs in switched:
                obs.fake_quant = False
            measured.append(
                LayerGroup(tensor, tuple(modules), macs, objective([prepared(*b) for b in batches], references))
            )
            for obs in switched:
                obs.fake_quant = True
    total = sum(g.macs for g in measured)
    cheapest = min((g.macs for g in measured if g.macs > 0), default=0) / max(total, 1)
    if 0.0 < budget < cheapest:
        raise ValueError(
            f"budget={budget!r} is below the cheapest group's share of multiply-accumulates: the "
            f"smallest feasible budget is {cheapest:.4f} (or 0 for no mixed precision)"
        )
    ranked = sorted(measured, key=lambda g: -(baseline - g.objective) / max(g.macs, 1))
    raised: list[LayerGroup] = []
    spent = 0
    for g in ranked:
        if g.objective < baseline and spent + g.macs <= budget * total:
            raised.append(g)
            spent += g.macs
    return PrecisionPlan(budget, tuple(raised), tuple(ranked), total, baseline)
