"""ESC's staged search: the graph cut into stages at single-tensor boundaries, each stage's
scales searched by CMA-ES in graph order with everything before it cached.

A cut is a point in graph order that exactly one activation tensor crosses (in a
pre-LayerNorm transformer: the residual stream between sub-blocks, so a Whisper block holds
two candidate cuts). The scales of a stage change nothing before its first node, so the
stage's inputs (the tensor crossing the cut before it, computed with the earlier stages'
final scales) are computed once per stage and batch, and a candidate costs one run of the
stage's own nodes instead of the whole model. Objective of a stage: the noise-to-signal
ratio of the tensor crossing its end against the float model's (for the last stage: the
search's objective on the model's outputs). Evaluating a stage runs the same ops in the
same order as the prepared model's forward, so a stage's value equals the full forward's
value of that tensor bit for bit (tested).

The stages' result is the starting point of the flat global search over all scales
(``SearchConfig.budget`` generations, 0 for none).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import cma
import numpy as np
import torch
from torch.fx import GraphModule, Interpreter, Node

from esc_ao.config import SearchConfig
from esc_ao.observers import observer_mode
from esc_ao.pipeline import Batch
from esc_ao.search.distributed import Cluster
from esc_ao.search.es import PENALTY, cma_options, generation_batches
from esc_ao.search.objectives import Objective, objective_parts
from esc_ao.search.space import ScaleDim

__all__ = ["Stage", "StagedSearch", "plan_stages"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """A contiguous run of graph nodes and the search dimensions whose observers it calls.

    ``inputs``: nodes before the stage whose values the stage or later stages read (its
    cache); ``boundary``: the one activation crossing the stage's end (None for the last
    stage, which ends at the graph's output); ``rerun``: observer calls before the stage on
    tensors that do not depend on the input (constants of a decomposed LayerNorm, say)
    whose only readers are in this stage: their scales are searched here, so they are
    computed again from the cache before the stage's own nodes."""

    nodes: list[Node]
    dims: list[int]
    inputs: list[Node]
    boundary: Node | None
    rerun: list[Node] = field(default_factory=list)


def _downstream_of(gm: GraphModule, seeds: set[Node]) -> set[Node]:
    """``seeds`` and every node that reads one of them, directly or not."""
    reached = set(seeds)
    for n in gm.graph.nodes:
        if n not in reached and any(a in reached for a in n.all_input_nodes):
            reached.add(n)
    return reached


def _input_dependent(gm: GraphModule) -> set[Node]:
    """Nodes whose value depends on the model's inputs."""
    return _downstream_of(gm, {n for n in gm.graph.nodes if n.op == "placeholder"})


def _noisy_nodes(gm: GraphModule, dims: list[ScaleDim]) -> set[Node]:
    """Nodes whose value an activation scale can change: everything downstream of an
    activation observer's call. The rest (masks from lengths, parameters, the input before
    its first observer) is the same in every candidate and is simply cached."""
    return _downstream_of(gm, {n for d in dims for n in d.nodes})


def _cuts(
    gm: GraphModule, dims: list[ScaleDim], dependent: set[Node], straddle: bool = False
) -> list[tuple[int, Node]]:
    """(position, crossing node) of every point in graph order that exactly one
    input-dependent tensor a scale can change crosses and, unless ``straddle``, no
    observer's calls straddle (an observer shared by tensors on both sides belongs to the
    stage of its first call, whose objective then misses its later calls). The crossing
    tensor is never an observer's output: a stage ending on a tensor it quantizes would
    score that tensor's own rounding, not what the rounding does to its readers (measured
    on Whisper tiny.en: a stage ending on the front end's quantized output chose scales
    that tripled the next stage's error). A cut just before such an observer puts the
    observer, and its scale, in the stage of its readers."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    noisy = _noisy_nodes(gm, dims) & dependent
    observer_calls = {n for d in dims for n in d.nodes}
    last_use = {n: max((pos[u] for u in n.users), default=pos[n]) for n in nodes}
    spans = [(pos[d.nodes[0]], pos[d.nodes[-1]]) for d in dims]
    cuts: list[tuple[int, Node]] = []
    live: set[Node] = set()
    for p in range(1, len(nodes)):
        prev = nodes[p - 1]
        if prev in noisy and last_use[prev] >= p:
            live.add(prev)
        live = {n for n in live if last_use[n] >= p}
        if nodes[p].op == "output" or len(live) != 1:
            continue
        crossing = next(iter(live))
        if crossing in observer_calls:
            continue
        if not straddle and any(lo < p <= hi for lo, hi in spans):
            continue
        cuts.append((p, crossing))
    return cuts


def plan_stages(gm: GraphModule, dims: list[ScaleDim], n_stages: int) -> list[Stage]:
    """At most ``n_stages`` stages holding about equal numbers of dimensions, cut at
    single-tensor boundaries (fewer when the graph has fewer such cuts)."""
    if n_stages < 1:
        raise ValueError(f"n_stages={n_stages} must be >= 1")
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    dependent = _input_dependent(gm)
    flowing = [i for i, d in enumerate(dims) if any(n in dependent for n in d.nodes)]
    constant = [i for i in range(len(dims)) if i not in set(flowing)]
    # where a dimension acts: its first call, or for a constant's observer its first reader
    acts_at = {i: pos[dims[i].nodes[0]] for i in flowing}
    acts_at.update({i: min(pos[u] for n in dims[i].nodes for u in n.users) for i in constant})
    first = sorted(acts_at.values())
    chosen: list[tuple[int, Node]] = []
    cuts = _cuts(gm, [dims[i] for i in flowing], dependent)
    if len(cuts) < n_stages - 1:
        # Graphs whose quantizer shares observers across the residual stream (Arm's) have
        # few clean cuts: take the others too.
        cuts = _cuts(gm, [dims[i] for i in flowing], dependent, straddle=True)
    done = 0  # dimensions before the last chosen cut
    for j in range(1, n_stages):
        # the cut that leaves the number of dimensions before it closest to j / n_stages
        # of them, with at least one dimension in the stage it closes
        options = [(sum(f < c[0] for f in first), c) for c in cuts if not chosen or c[0] > chosen[-1][0]]
        options = [(count, c) for count, c in options if count > done]
        if not options:
            break
        count, cut = min(options, key=lambda o: (abs(o[0] - j * len(first) / n_stages), o[1][0]))
        chosen.append(cut)
        done = count
    bounds = [0, *[p for p, _ in chosen], len(nodes)]

    def stage_of(position: int) -> int:
        return max(k for k in range(len(bounds) - 1) if bounds[k] <= position)

    stages: list[Stage] = []
    for k in range(len(bounds) - 1):
        lo, hi = bounds[k], bounds[k + 1]
        stage_dims = [i for i in flowing if lo <= acts_at[i] < hi]
        rerun: list[Node] = []
        for i in constant:
            readers = {stage_of(pos[u]) for n in dims[i].nodes for u in n.users}
            if readers == {k}:  # read by other stages too: left to the flat search
                stage_dims.append(i)
                rerun += [n for n in dims[i].nodes if pos[n] < lo]
        later = [*rerun, *nodes[lo:]]
        inputs = sorted({a for n in later for a in n.all_input_nodes if pos[a] < lo}, key=pos.__getitem__)
        boundary = chosen[k][1] if k < len(chosen) else None
        stages.append(Stage(nodes[lo:hi], sorted(stage_dims), inputs, boundary, sorted(rerun, key=pos.__getitem__)))
    return stages


class _StageRunner:
    """Runs one stage's nodes from cached inputs, freeing each value after its last use
    within the stage (the cache and the boundary are kept)."""

    def __init__(self, gm: GraphModule, stage: Stage, keep: set[Node]) -> None:
        self.gm, self.stage = gm, stage
        pos = {n: i for i, n in enumerate(stage.nodes)}
        self.free_after: dict[Node, list[Node]] = {}
        for n in stage.nodes:
            if n in keep or n.op == "output":
                continue
            uses = [pos[u] for u in n.users if u in pos]
            last = stage.nodes[max(uses)] if uses else n
            self.free_after.setdefault(last, []).append(n)

    def run(self, cache: dict[Node, Any], batch: Batch) -> dict[Node, Any]:
        interp = Interpreter(self.gm, garbage_collect_values=False)
        interp.env = dict(cache)
        interp.args_iter = iter(self.gm.graph.process_inputs(*batch))
        for n in self.stage.rerun:
            interp.env[n] = interp.run_node(n)
        for n in self.stage.nodes:
            interp.env[n] = interp.run_node(n)
            for dead in self.free_after.get(n, ()):
                interp.env.pop(dead, None)
        return interp.env


def _nsr_parts(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    return float((out - ref).pow(2).sum()), float(ref.pow(2).sum())


class StagedSearch:
    """The stages of one prepared model over one shard of calibration batches: the float
    values at every boundary (once), the stage caches (once per stage), and a CMA-ES run
    per stage."""

    def __init__(
        self,
        prepared: GraphModule,
        dims: list[ScaleDim],
        stages: list[Stage],
        shard: list[Batch],
        objective: Objective,
        references: list[Any],
        cluster: Cluster,
    ) -> None:
        self.prepared, self.dims, self.stages, self.shard = prepared, dims, stages, shard
        self.objective, self.references, self.cluster = objective, references, cluster
        keep = {s.boundary for s in stages if s.boundary is not None} | {n for s in stages for n in s.inputs}
        self.runners = [_StageRunner(prepared, s, keep) for s in stages]
        self.float_boundaries = self._float_boundaries()
        self.caches: list[dict[Node, Any]] = [{} for _ in shard]  # the current stage's inputs, per batch
        self.evaluations = 0

    @torch.no_grad()
    def _float_boundaries(self) -> list[dict[Node, torch.Tensor]]:
        out: list[dict[Node, torch.Tensor]] = []
        with observer_mode(self.prepared, observing=False, fake_quant=False):
            for batch in self.shard:
                env: dict[Node, Any] = {}
                found: dict[Node, torch.Tensor] = {}
                for runner in self.runners:
                    env = runner.run({n: env[n] for n in runner.stage.inputs}, batch)
                    if runner.stage.boundary is not None:
                        found[runner.stage.boundary] = env[runner.stage.boundary]
                out.append(found)
        return out

    def advance(self, k: int) -> None:
        """Runs stage ``k`` at its current scales on every batch and keeps what stage
        ``k + 1`` reads: its cache."""
        if k + 1 >= len(self.stages):
            return
        nxt = self.stages[k + 1].inputs
        with torch.no_grad(), observer_mode(self.prepared, observing=False, fake_quant=True):
            for i, batch in enumerate(self.shard):
                env = self.runners[k].run(self.caches[i], batch)
                self.caches[i] = {n: env[n] for n in nxt}

    @torch.no_grad()
    def stage_value(self, k: int, scales: Sequence[float], batches: Sequence[int]) -> float:
        """Stage ``k``'s objective on the given batch indices (this rank's shard) with the
        stage's dimensions at ``scales``, summed over ranks."""
        stage = self.stages[k]
        self._set(k, scales)
        num = den = 0.0
        outputs, refs = [], []
        with observer_mode(self.prepared, observing=False, fake_quant=True):
            for i in batches:
                env = self.runners[k].run(self.caches[i], self.shard[i])
                if stage.boundary is None:
                    outputs.append(self.prepared.graph.process_outputs(env[stage.nodes[-1]]))
                    refs.append(self.references[i])
                else:
                    n, d = _nsr_parts(env[stage.boundary], self.float_boundaries[i][stage.boundary])
                    num, den = num + n, den + d
        if stage.boundary is None:
            num, den = objective_parts(self.objective, outputs, refs)
        num, den = self.cluster.sum_parts(num, den)
        self.evaluations += 1
        return num / den if den != 0 else math.nan

    def _set(self, k: int, scales: Sequence[float]) -> None:
        for i, s in zip(self.stages[k].dims, scales):
            self.dims[i].observer.set_scale(float(s))

    def search_stage(
        self,
        k: int,
        start: list[float],
        config: SearchConfig,
        on_generation: Callable[[int, list[float]], None] | None = None,
    ) -> tuple[list[float], float, float]:
        """CMA-ES over stage ``k``'s scales (log offsets from ``start``, the stage's current
        scales); returns (scales, start value, final value), keeping the start where the
        search did not lower the stage's objective on all of this stage's batches."""
        everything = list(range(len(self.shard)))
        start_value = self.stage_value(k, start, everything)
        n = len(start)
        es = None
        if self.cluster.is_driver and config.stage_budget > 0:
            # One-dimensional CMA-ES is not defined in pycma: a stage of one scale searches
            # a duplicated coordinate and reads the first.
            es = cma.CMAEvolutionStrategy(np.zeros(max(n, 2)), config.sigma0, cma_options(config, config.stage_budget))

        def scales_of(x: Sequence[float]) -> list[float]:
            return [s * math.exp(float(v)) for s, v in zip(start, x)]

        gen = 0
        while True:
            candidates = es.ask() if es is not None and es.countiter < config.stage_budget else None
            candidates = self.cluster.broadcast(candidates)
            if candidates is None:
                break
            gen += 1
            pick = generation_batches(len(self.shard), config, (k + 1, gen))
            values = [self.stage_value(k, scales_of(x), pick) for x in candidates]
            if es is not None:
                es.tell(candidates, [v if math.isfinite(v) else PENALTY for v in values])
            if on_generation is not None:
                on_generation(gen, values)
        x = None
        if es is not None:
            x = es.mean if config.final == "mean" else es.result.xbest
            x = [float(v) for v in np.asarray(x)[:n]]
        x = self.cluster.broadcast(x)
        if x is None:
            self._set(k, start)  # leaves the stage at its start
            return list(start), start_value, start_value
        scales = scales_of(x)
        final_value = self.stage_value(k, scales, everything)
        if not (math.isfinite(final_value) and final_value < start_value):
            self._set(k, start)
            return list(start), start_value, start_value
        return scales, start_value, final_value
