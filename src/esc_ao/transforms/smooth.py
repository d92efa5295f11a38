"""SmoothQuant-style channel smoothing folded into LayerNorm affines.

A LayerNorm's output feeds linears; a few of its channels carry most of the range (in
Whisper tiny.en they come from LayerNorm gains far above the others), so one per-tensor
scale leaves the other channels a handful of levels. For factors s > 0 per channel,

    linear(ln(x) * gamma + beta; W) == linear(ln(x) * gamma / s + beta / s; W * s)

exactly, so dividing the affine by s and multiplying the readers' weight columns by s
moves range from the activation (quantized per tensor) into the weights (quantized per
output channel, where a wider column costs little). SmoothQuant's factors are
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); alpha per LayerNorm is picked on
calibration data by the readers' output error with the activation on the int8 grid (MSE
clip) and per-channel weights, among ``SMOOTH_ALPHAS`` and "no smoothing" (so a site
is never made worse by that measure).

Sites that cannot be transformed exactly are skipped with a reason: a LayerNorm without
affine, one whose output is read by anything but a linear's input, a linear weight used
elsewhere (tied embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch.fx import GraphModule, Interpreter, Node

from esc_ao.graph_prep import arg_node, drop_noop_casts, replace_parameter, resolve_attr, shared_weight
from esc_ao.observers import qrange
from esc_ao.pipeline import Batch
from esc_ao.transforms.records import TransformRecord, check_finite

__all__ = ["SMOOTH_ALPHAS", "smooth"]

aten = torch.ops.aten
SMOOTH_ALPHAS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_SAMPLE_ROWS = 4096  # activation rows per site kept for picking alpha
_CLIP_GRID = 24  # candidate clips when scoring an alpha (fraction of max |x|)


@dataclass
class _Site:
    norm: Node
    affine: tuple[str, str]  # get_attr targets of the LayerNorm's weight and bias
    readers: list[Node]
    weight_targets: list[str]
    weights: list[torch.Tensor]


def smooth(
    gm: GraphModule, batches: Sequence[Batch], alpha: float | None = None, act_bits: int = 8, weight_bits: int = 8
) -> list[TransformRecord]:
    """Smooths every LayerNorm -> linear site of ``gm`` in place; returns one record per
    LayerNorm. ``alpha``: a fixed migration strength in [0, 1]; None picks one per site
    from ``SMOOTH_ALPHAS`` on ``batches`` at the given bit widths."""
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r} must lie in [0, 1] (SmoothQuant uses 0.5; None picks per site)")
    if not batches:
        raise ValueError("smooth needs at least one calibration batch to measure activation ranges")
    drop_noop_casts(gm)  # openai-whisper's casts sit between LayerNorms and their readers
    records: list[TransformRecord] = []
    sites: list[_Site] = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == aten.layer_norm.default:
            site, reason = _site(gm, node)
            if site is None:
                records.append(TransformRecord(node.name, "smooth", False, reason))
            else:
                sites.append(site)
    samples = _collect(gm, batches, [s.norm for s in sites])
    for site in sites:
        x = samples[site.norm.name]
        w_max = torch.stack([w.detach().abs().amax(dim=0) for w in site.weights]).amax(dim=0)
        a_max = x.abs().amax(dim=0)
        chosen, gain = _choose(x, site.weights, a_max, w_max, alpha, act_bits, weight_bits)
        if chosen is None:
            records.append(
                TransformRecord(site.norm.name, "smooth", False, "no alpha lowers the readers' quantized output error")
            )
            continue
        _apply(gm, site, _factors(a_max, w_max, chosen))
        records.append(
            TransformRecord(
                site.norm.name,
                "smooth",
                True,
                f"alpha {chosen:g} into {len(site.readers)} linear(s); readers' output " f"error x{gain:.3f}",
            )
        )
    gm.recompile()
    return records


def _site(gm: GraphModule, norm: Node) -> tuple[_Site | None, str]:
    """The LayerNorm's affine and readers, or None and why it cannot be smoothed exactly."""
    args = list(norm.args) + [None] * (5 - len(norm.args))
    w_node, b_node = args[2], args[3]
    if not (
        isinstance(w_node, Node) and w_node.op == "get_attr" and isinstance(b_node, Node) and b_node.op == "get_attr"
    ):
        return None, "LayerNorm without a weight and bias to fold the factors into"
    if len(w_node.users) > 1 or len(b_node.users) > 1:
        return None, "LayerNorm affine shared with another op"
    readers = list(norm.users)
    for r in readers:
        if not (r.op == "call_function" and r.target == aten.linear.default and r.args[0] is norm):
            return None, f"output read by {r.name} ({r.target}), not only by linear inputs"
        if not (isinstance(r.args[1], Node) and r.args[1].op == "get_attr"):
            return None, f"{r.name}'s weight is not a parameter of the graph"
    weights = [resolve_attr(gm, str(arg_node(r, 1).target)) for r in readers]
    for r in readers:
        if shared_weight(gm, arg_node(r, 1)):
            return None, f"{r.name}'s weight is also used elsewhere (tied weights)"
    return _Site(
        norm, (str(w_node.target), str(b_node.target)), readers, [str(arg_node(r, 1).target) for r in readers], weights
    ), ""


class _Recorder(Interpreter):
    """Runs the graph and keeps a subsample of rows of the named nodes' outputs."""

    def __init__(self, gm: GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names = names
        self.rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def run_node(self, n: Node) -> object:
        out = super().run_node(n)
        if n.name in self.names and isinstance(out, torch.Tensor):
            check_finite(out, "smooth", f"the output of {n.name}")
            self.rows[n.name].append(out.detach().reshape(-1, out.shape[-1]).float())
        return out


def _collect(gm: GraphModule, batches: Iterable[Batch], norms: list[Node]) -> dict[str, torch.Tensor]:
    """Each LayerNorm's output rows over the batches, evenly subsampled to _SAMPLE_ROWS,
    with every row holding a channel's maximum kept (alpha's factors depend on them)."""
    rec = _Recorder(gm, {n.name for n in norms})
    with torch.no_grad():
        for batch in batches:
            rec.run(*batch)
    out = {}
    for name, parts in rec.rows.items():
        x = torch.cat(parts)
        keep = set(x.abs().argmax(dim=0).tolist())
        step = max(1, x.shape[0] // _SAMPLE_ROWS)
        keep.update(range(0, x.shape[0], step))
        out[name] = x[sorted(keep)]
    return out


def _factors(a_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    s = a_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1.0 - alpha)
    return s.clamp(1e-4, 1e4)


def _fq_tensor(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x on a symmetric per-tensor grid with the MSE-best clip (as the MSE observer picks)."""
    qmax = qrange(bits)[1]
    amax = float(x.abs().max())
    if amax == 0.0:
        return x
    best, best_err = x, float("inf")
    for k in range(1, _CLIP_GRID + 1):
        scale = amax * k / _CLIP_GRID / qmax
        q = (x / scale).round().clamp(-qmax - 1, qmax) * scale
        err = float((q - x).pow(2).sum())
        if err < best_err:
            best, best_err = q, err
    return best


def _fq_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = qrange(bits, weight=True)[1]
    scale = (w.abs().amax(dim=1, keepdim=True) / qmax).clamp(min=1e-12)
    return (w / scale).round().clamp(-qmax, qmax) * scale


def _error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor, act_bits: int, weight_bits: int) -> float:
    xq = _fq_tensor(x / s, act_bits)
    return sum(float((xq @ _fq_weight(w.detach() * s, weight_bits).T - x @ w.detach().T).pow(2).sum()) for w in weights)


def _choose(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    a_max: torch.Tensor,
    w_max: torch.Tensor,
    alpha: float | None,
    act_bits: int,
    weight_bits: int,
) -> tuple[float | None, float]:
    """(alpha, error ratio against no smoothing), or (None, 1) when none helps."""
    with torch.no_grad():
        base = _error(x, weights, torch.ones_like(a_max), act_bits, weight_bits)
        grid = (alpha,) if alpha is not None else SMOOTH_ALPHAS
        scored = [(_error(x, weights, _factors(a_max, w_max, a), act_bits, weight_bits), a) for a in grid]
    err, best = min(scored)
    if alpha is None and not err < base:
        return None, 1.0
    return best, err / base if base > 0 else 1.0


def _apply(gm: GraphModule, site: _Site, s: torch.Tensor) -> None:
    """New parameters, not in-place updates: an exported graph shares its parameters with
    the model it was exported from, which must stay the float reference."""
    with torch.no_grad():
        for target in site.affine:
            replace_parameter(gm, target, resolve_attr(gm, target) / s)
        for target in site.weight_targets:
            replace_parameter(gm, target, resolve_attr(gm, target) * s)
