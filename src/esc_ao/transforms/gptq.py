"""GPTQ rounding of linear weights from calibration data.

Round-to-nearest puts each weight on its per-channel grid alone; GPTQ (Frantar et al.,
2023) rounds a layer's input columns one at a time and spreads each column's rounding
error over the columns not yet rounded, weighted by the inverse Hessian of the layer's
output error, H = X^T X over the calibration inputs X. At 4 bits this is what keeps a
layer's output close to float where rounding each weight alone does not.

The weights written back lie exactly on the grid the quantizer's weight observer will
find: each output channel (or, with ``group_size``, each group of ``group_size``
consecutive input channels of it) keeps its scale max|w| / qmax (its largest weight is
held at +-qmax while its other weights absorb the error, and levels stay within
[-qmax, qmax]), so the observer's round-to-nearest reproduces GPTQ's integers. Group
scales are those of the float weight ("static groups"), so the grid is known before the
columns are rounded. Unlike
the smoothing transform this one is not float-exact: it moves the weights onto the grid
of ``weight_bits``, so it must run with that bit width.

Inputs are the float model's (no sequential requantization of earlier layers); columns
are processed in their natural order, or with ``act_order`` in decreasing order of the
Hessian's diagonal (the inputs with the most energy first, while the most columns are
left to absorb their error: GPTQ's "act-order", compatible with the static group
scales above); the Hessian is damped by 1 % of its mean diagonal.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.fx import GraphModule, Interpreter, Node

from esc_ao.annotators import uses_groups
from esc_ao.graph_prep import arg_node, replace_parameter, resolve_attr, tied_linears
from esc_ao.observers import qrange
from esc_ao.pipeline import Batch
from esc_ao.transforms.records import TransformRecord, check_finite

__all__ = ["gptq"]

aten = torch.ops.aten
_DAMP = 0.01
_CHECK_ROWS = 2048  # input rows kept per layer to report the output error against rounding


class _Hessians(Interpreter):
    """Runs the graph and accumulates X^T X of every named linear's input."""

    def __init__(self, gm: GraphModule, linears: list[Node]) -> None:
        super().__init__(gm)
        self.linears = {n.name for n in linears}
        self.h: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.sample: dict[str, torch.Tensor] = {}

    def run_node(self, n: Node) -> object:
        if n.name in self.linears:
            x_in = self.env[arg_node(n, 0)]
            x = x_in.detach().reshape(-1, x_in.shape[-1]).double()
            check_finite(x, "gptq", f"the input of {n.name}")
            self.h[n.name] = self.h.get(n.name, 0) + x.T @ x
            self.rows[n.name] = self.rows.get(n.name, 0) + x.shape[0]
            if n.name not in self.sample:
                step = max(1, x.shape[0] // _CHECK_ROWS)
                self.sample[n.name] = x[::step].float()
        return super().run_node(n)


def gptq(
    gm: GraphModule, batches: Sequence[Batch], weight_bits: int, group_size: int | None = None, act_order: bool = False
) -> list[TransformRecord]:
    """GPTQ-rounds the weight of every linear of ``gm`` in place for ``weight_bits``-bit
    per-channel grids, or group-wise ones where ``group_size`` divides the input width
    (as ``QuantConfig.weight_group``); returns one record per linear (skipped: tied or
    non-parameter weights). ``act_order``: columns in decreasing Hessian diagonal."""
    if not batches:
        raise ValueError("gptq needs at least one calibration batch to estimate each layer's Hessian")
    qmax = qrange(weight_bits, weight=True)[1]
    tied = set(tied_linears(gm))  # also drops no-op casts that would hide weights
    records: list[TransformRecord] = []
    linears: list[Node] = []
    for node in gm.graph.nodes:
        if not (node.op == "call_function" and node.target == aten.linear.default):
            continue
        w = node.args[1]
        if not (isinstance(w, Node) and w.op == "get_attr"):
            records.append(TransformRecord(node.name, "gptq", False, "weight is not a parameter of the graph"))
        elif node.name in tied:
            records.append(TransformRecord(node.name, "gptq", False, "weight also used elsewhere (tied weights)"))
        else:
            linears.append(node)
    stats = _Hessians(gm, linears)
    with torch.no_grad():
        for batch in batches:
            stats.run(*batch)
        for node in linears:
            target = str(node.args[1].target)
            weight = resolve_attr(gm, target).detach().float()
            h = stats.h[node.name] / stats.rows[node.name]
            # the quantizer's own rule, so GPTQ's grid is the one its observer will find
            group = group_size if group_size is not None and uses_groups(node, group_size) else weight.shape[1]
            rounded = _gptq_rows(weight, h.float(), qmax, group, act_order)
            x = stats.sample[node.name]
            scale = _group_scales(weight, qmax, group).repeat_interleave(group, dim=1)
            rtn = (weight / scale).round().clamp(-qmax, qmax) * scale
            ref = x @ weight.T
            ratio = float((x @ rounded.T - ref).pow(2).sum() / (x @ rtn.T - ref).pow(2).sum().clamp(min=1e-30))
            replace_parameter(gm, target, rounded.to(resolve_attr(gm, target).dtype))
            grid = f" group-{group}" if group != weight.shape[1] else ""  # per-channel: no word
            order = ", act-order" if act_order else ""
            records.append(
                TransformRecord(
                    node.name,
                    "gptq",
                    True,
                    f"{weight_bits}-bit{grid} weights{order}; layer " f"output error x{ratio:.3f} of round-to-nearest",
                )
            )
    gm.recompile()
    return records


def _group_scales(weight: torch.Tensor, qmax: int, group: int) -> torch.Tensor:
    """(out, in / group) scales max|w_group| / qmax, as the weight observers compute them."""
    return weight.abs().reshape(weight.shape[0], -1, group).amax(dim=2).clamp(min=1e-12) / qmax


def _gptq_rows(weight: torch.Tensor, h: torch.Tensor, qmax: int, group: int, act_order: bool = False) -> torch.Tensor:
    """The weight (out, in) rounded column by column onto grids of scale
    max|w_group| / qmax per row and group of ``group`` columns (``group`` = in: per row),
    each column's error spread over the later ones through the Cholesky factor of H^-1
    (the GPTQ update); ``act_order``: columns taken in decreasing diag(H)."""
    out_features, in_features = weight.shape
    rows_idx = torch.arange(out_features)
    scales = _group_scales(weight, qmax, group)  # (out, groups), of the float weight
    # each group's largest weight stays at +-qmax: keeps its scale (absolute column index)
    pinned = weight.abs().reshape(out_features, -1, group).argmax(dim=2) + torch.arange(0, in_features, group)
    pinned_level = torch.sign(weight[rows_idx[:, None], pinned]) * qmax
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w = weight.clone()
    w[:, dead] = 0.0
    # perm[i]: the original column processed i-th
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(in_features)
    w, h = w[:, perm], h[perm][:, perm]
    h += _DAMP * torch.diag(h).mean() * torch.eye(in_features)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.empty_like(w)
    for i in range(in_features):
        col, orig = w[:, i], int(perm[i])
        g = orig // group
        scale = scales[:, g]
        level = (col / scale).round().clamp(-qmax, qmax)
        rows = pinned[:, g] == orig
        level[rows] = pinned_level[rows, g]
        q[:, i] = level * scale
        err = (col - q[:, i]) / hinv[i, i]
        w[:, i + 1 :] -= err[:, None] * hinv[i, i + 1 :][None, :]
    out = torch.empty_like(q)
    out[:, perm] = q
    return out
