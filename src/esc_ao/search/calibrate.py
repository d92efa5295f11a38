"""ESC: local MSE initialisation, then CMA-ES over all activation scales jointly.

    prepared = prepare_pt2e(gm, quantizer)          # EscQuantizer or any PT2E quantizer
    for batch in calib: prepared(*batch)            # observers see the data
    result = esc_ao.calibrate(prepared, calib)      # writes the searched scales back
    converted = convert_pt2e(prepared)

Search space (paper section "Method"; parameterisation not stated there, chosen here):
x_i = log(s_i / s_i^local), so x = 0 is the local solution, CMA-ES's isotropic sigma0
means the same relative change for a tiny and a huge tensor, and scales stay positive.
A candidate is evaluated by writing its scales into the observers and running the prepared
model once over the calibration batches with the observers in fake-quant mode: no
re-prepare, no convert, no model copy. The float reference outputs are computed once.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import cma
import numpy as np
import torch
from torch.fx import GraphModule, Interpreter, Node

from esc_ao.config import SearchConfig
from esc_ao.observers import observer_mode
from esc_ao.pipeline import Batch, as_batches
from esc_ao.search.checkpoint import CheckpointError, load_checkpoint, object_state, restore_object, save_checkpoint
from esc_ao.search.distributed import Cluster, cluster_from_env
from esc_ao.search.es import PENALTY, cma_options, generation_batches
from esc_ao.search.local_step import local_mse_scales
from esc_ao.search.objectives import Objective, OutputMSE, objective_parts
from esc_ao.search.space import ScaleDim, find_scale_dims
from esc_ao.search.staged import StagedSearch, plan_stages

__all__ = ["CalibrationResult", "CheckpointError", "NonFiniteObjectiveError", "calibrate"]

log = logging.getLogger(__name__)


class NonFiniteObjectiveError(RuntimeError):
    """Every candidate of a generation gave a non-finite objective."""


@dataclass(kw_only=True)
class CalibrationResult:
    """What the search did. Scales are listed in ``labels`` order. Built by keyword."""

    labels: list[str]
    observer_scales: list[float]  # from the observers' statistics (method's own choice)
    initial_scales: list[float]  # after the local step: the search's starting point
    final_scales: list[float]
    initial_objective: float
    final_objective: float
    improved: bool
    message: str
    evaluations: int
    wall_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    # the held-out check (None without held-out batches): objective of the start and of
    # the searched scales on batches the search did not score
    holdout_start: float | None = None
    holdout_final: float | None = None
    start: str = ""  # which starting point the local step chose (also the message's first part)
    # the staged search, one entry per stage: scales, boundary, objective before and after
    stages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def evaluations_per_second(self) -> float:
        return self.evaluations / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["evaluations_per_second"] = self.evaluations_per_second
        return out


# --- evaluation -------------------------------------------------------------------------


@dataclass
class SearchState:
    """Where a search stands: its start, the best candidate, the history and pycma's own
    state; the checkpoint file holds its fields (``asdict``) and is resumed from them."""

    fingerprint: str
    local: list[float]  # the start's scales; candidates are log-offsets from them
    init_obj: float
    start: str  # which start the local step chose
    evaluations: int = 2  # the two starts the local step scored
    best: tuple[float, np.ndarray | None] = (math.inf, None)
    history: list[dict[str, float]] = field(default_factory=list)
    x_mean: np.ndarray | None = None
    es: dict[str, Any] | None = None  # pycma's state (esc_ao.search.checkpoint.object_state)
    np_rng: Any = None  # numpy's global RNG state (np.random.get_state), which pycma samples from
    kind: str = "flat search"  # or "staged search (N stages)": a checkpoint resumes only its own kind
    # The staged search's progress: every scale as the finished stages left it, how many
    # stages are finished, and its result as log-offsets from ``local`` (None until done).
    stage_scales: list[float] | None = None
    stages_done: int = 0
    staged: list[float] | None = None
    stage_log: list[dict[str, Any]] = field(default_factory=list)


@torch.no_grad()
def _outputs(prepared: GraphModule, batches: list[Batch], fake_quant: bool) -> list[Any]:
    with observer_mode(prepared, observing=False, fake_quant=fake_quant):
        return [prepared(*b) for b in batches]


def _set_scales(dims: list[ScaleDim], scales: Sequence[float]) -> None:
    for d, s in zip(dims, scales):
        d.observer.set_scale(float(s))


class _Evaluator:
    """objective(scales) over this rank's shard, all-reduced over ranks: one simulated
    forward per batch, no re-prepare, no convert, no model copy."""

    def __init__(
        self, prepared: GraphModule, dims: list[ScaleDim], shard: list[Batch], objective: Objective, cluster: Cluster
    ) -> None:
        self.prepared, self.dims, self.shard, self.objective, self.cluster = prepared, dims, shard, objective, cluster
        self.refs = _outputs(prepared, shard, fake_quant=False)  # the float reference, once
        self.count = 0

    def __call__(self, scales: Sequence[float], batches: Sequence[int] | None = None) -> float:
        """The objective over all of this rank's batches, or over the given indices."""
        _set_scales(self.dims, scales)
        pick = range(len(self.shard)) if batches is None else batches
        outputs = _outputs(self.prepared, [self.shard[i] for i in pick], fake_quant=True)
        refs = [self.refs[i] for i in pick]
        num, den = self.cluster.sum_parts(*objective_parts(self.objective, outputs, refs))
        self.count += 1
        return num / den if den != 0 else math.nan


@torch.no_grad()
def _first_nonfinite(prepared: GraphModule, batch: Batch) -> str:
    """Name of the first node whose output is non-finite in fake-quant mode."""
    found: list[str] = []

    class Probe(Interpreter):
        def run_node(self, n: Node) -> Any:
            out = super().run_node(n)
            if (
                not found
                and isinstance(out, torch.Tensor)
                and out.is_floating_point()
                and not bool(torch.isfinite(out).all())
            ):
                found.append(n.name)
            return out

    with observer_mode(prepared, observing=False, fake_quant=True):
        Probe(prepared).run(*batch)
    return found[0] if found else "(none: the objective itself returned a non-finite value)"


# --- checkpoint --------------------------------------------------------------------------


def _fingerprint(dims: list[ScaleDim], observer_scales: list[float], config: SearchConfig, n_batches: int) -> str:
    cfg = {k: v for k, v in asdict(config).items() if k not in ("progress", "dist_timeout_s")}
    payload = repr(([d.label for d in dims], [f"{s:.9e}" for s in observer_scales], sorted(cfg.items()), n_batches))
    return hashlib.sha256(payload.encode()).hexdigest()


def _search_kind(config: SearchConfig) -> str:
    return "flat search" if config.stages == 1 else f"staged search ({config.stages} stages)"


def _load_state(path: Path, fingerprint: str, kind: str) -> SearchState | None:
    if not path.exists():
        return None
    state = load_checkpoint(path)
    saved = state.get("kind", "flat search")
    if saved != kind:
        raise CheckpointError(
            f"checkpoint {path} holds a {saved} and this run is a {kind}: resume it with the "
            "same SearchConfig.stages, or delete it or pass another path to start afresh"
        )
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint {path} was written for another model, calibration set or SearchConfig "
            "(observer labels, their scales or the search settings differ): delete it or pass another path"
        )
    return SearchState(**state)


# --- CMA-ES ------------------------------------------------------------------------------


def calibrate(
    prepared: GraphModule,
    data: Iterable[Any],
    objective: Objective | None = None,
    config: SearchConfig = SearchConfig(),
    checkpoint: str | Path | None = None,
    holdout: Iterable[Any] | None = None,
    holdout_objective: Objective | None = None,
) -> CalibrationResult:
    """Searches the activation scales of a prepared, observed model and writes them into
    its observers (``convert_pt2e`` then uses them).

    Args:
        prepared: the model returned by ``prepare_pt2e`` after the calibration batches ran.
        data: calibration batches (input tuples or single tensors).
        objective: what to minimise; default ``OutputMSE`` against the float model.
        config: search settings.
        checkpoint: file to write the search state to after each generation; an existing
            one for the same model and config is resumed.
        holdout: calibration batches the search does not score. When given, the searched
            scales are kept only if they also beat the search's start on these; otherwise
            the start is kept. On a flat objective CMA-ES's mean drifts to scales that fit
            the scored batches only (measured on the W8A8 Conformer-CTC: CTC loss lower,
            test WER 42.2 % against 41.0 % at the start).
        holdout_objective: the objective on ``holdout``; default ``objective`` (pass
            another when the objective holds per-batch targets).

    Raises:
        NoObserversError, CalibrationDataError, CheckpointError, NonFiniteObjectiveError.
    """
    # Softmax probabilities and other tiny activations are float32 denormals, on which x86
    # rounding takes a microcode assist: measured 3.5x slower searches. Flushing them to
    # zero changes nothing a quantizer keeps (they all round to level 0).
    flush = torch.set_flush_denormal(True)
    try:
        return _calibrate(prepared, data, objective, config, checkpoint, holdout, holdout_objective)
    finally:
        if flush:
            torch.set_flush_denormal(False)


def _calibrate(
    prepared: GraphModule,
    data: Iterable[Any],
    objective: Objective | None,
    config: SearchConfig,
    checkpoint: str | Path | None,
    holdout: Iterable[Any] | None,
    holdout_objective: Objective | None,
) -> CalibrationResult:
    t0 = time.perf_counter()
    batches = as_batches(data)
    cluster = cluster_from_env(config.dist_timeout_s)
    dims = find_scale_dims(prepared)
    labels = [d.label for d in dims]
    for d in dims:
        d.observer.set_scale(None)
    observer_scales = [d.observer.init_scale for d in dims]
    evaluate = _Evaluator(prepared, dims, cluster.shard(batches), objective or OutputMSE(), cluster)

    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    fingerprint = _fingerprint(dims, observer_scales, config, len(batches))
    kind = _search_kind(config)
    if config.subsample is not None and not hasattr(objective or OutputMSE(), "parts"):
        raise ValueError(
            f"SearchConfig.subsample={config.subsample} needs a label-free objective (OutputMSE, LogitKL): "
            f"{type(objective).__name__} holds per-batch labels by position; use subsample=None"
        )
    state = _load_state(ckpt_path, fingerprint, kind) if ckpt_path and cluster.is_driver else None
    state = cluster.broadcast(state)
    if state is None:
        state = _start(prepared, dims, batches, config, evaluate, cluster, observer_scales, fingerprint)
        state.kind = kind
    local, init_obj = state.local, state.init_obj
    log.info("ESC: %d scales, start objective %.6g", len(dims), init_obj)

    def to_scales(x: Sequence[float] | np.ndarray) -> list[float]:
        return [s * math.exp(float(v)) for s, v in zip(local, x)]

    if config.stages > 1 and state.staged is None:
        _staged(prepared, dims, config, evaluate, state, ckpt_path)

    if config.budget > 0:
        _search(evaluate, config, state, to_scales, ckpt_path, batches[0])

    if config.budget == 0 and state.staged is not None:
        x_final: Any = np.asarray(state.staged, dtype=float)
    else:
        x_final = state.best[1] if config.final == "best" else state.x_mean
    final_scales = to_scales(x_final) if x_final is not None else list(local)
    final_obj = evaluate(final_scales)
    if math.isfinite(final_obj) and final_obj <= init_obj:
        improved, message = (
            final_obj < init_obj,
            (
                f"CMA-ES lowered the objective from {init_obj:.6g} to {final_obj:.6g}"
                if final_obj < init_obj
                else "the search did not change the objective"
            ),
        )
    else:
        improved, final_scales, final_obj = False, list(local), init_obj
        message = "the search did not improve on the local step; kept the local-step scales"
    held: tuple[float, float] | None = None
    if holdout is not None:
        held_out = _Evaluator(
            prepared, dims, cluster.shard(as_batches(holdout)), holdout_objective or objective or OutputMSE(), cluster
        )
        held = (held_out(local), held_out(final_scales)) if improved else (held_out(local),) * 2
        if improved and not held[1] < held[0]:
            improved, final_scales, final_obj = False, list(local), init_obj
            message += f", but not on the held-out batches ({held[0]:.6g} -> {held[1]:.6g}): kept the start"
        else:
            message += f"; held-out objective {held[0]:.6g} -> {held[1]:.6g}"
    _set_scales(dims, final_scales)
    message = f"start: {state.start}; {message}"
    log.info("ESC: %s", message)
    return CalibrationResult(
        labels=labels,
        observer_scales=observer_scales,
        initial_scales=list(local),
        final_scales=final_scales,
        initial_objective=init_obj,
        final_objective=final_obj,
        improved=improved,
        message=message,
        evaluations=state.evaluations + 1,
        wall_seconds=time.perf_counter() - t0,
        history=list(state.history),
        holdout_start=held[0] if held else None,
        holdout_final=held[1] if held else None,
        start=state.start,
        stages=list(state.stage_log),
    )


def _start(
    prepared: GraphModule,
    dims: list[ScaleDim],
    batches: list[Batch],
    config: SearchConfig,
    evaluate: _Evaluator,
    cluster: Cluster,
    observer_scales: list[float],
    fingerprint: str,
) -> SearchState:
    """The local step and the search's starting point (a fresh search state)."""
    # Every rank fits its share of the dimensions (each is fitted on its own) on the first
    # global batches, so every world size starts alike; the shares are then merged.
    mine = list(range(cluster.rank, len(dims), cluster.world))
    fitted = local_mse_scales(prepared, dims, batches[: config.local_batches], config.local_grid, mine)
    merged = cluster.merge(dict(zip(mine, fitted)))
    layer_mse = [merged[i] for i in range(len(dims))]
    # Start from whichever is better on the objective: the layer-output MSE scales or the
    # observers' own (for EscObserver, the tensor's own MSE optimum). Measured on a W4A4
    # Conformer, the layer-output step alone can start worse than tensor MSE.
    starts = {"layer-output MSE": layer_mse, "observer statistics": observer_scales}
    scored = {k: evaluate(v) for k, v in starts.items()}
    start = min(scored, key=lambda k: scored[k] if math.isfinite(scored[k]) else math.inf)
    log.info(
        "ESC local step: start from %s (objective %s)", start, ", ".join(f"{k} {v:.6g}" for k, v in scored.items())
    )
    if not math.isfinite(scored[start]):
        raise NonFiniteObjectiveError(
            f"the local-step scales give a non-finite objective; first non-finite node: "
            f"{_first_nonfinite(prepared, batches[0])}"
        )
    return SearchState(
        fingerprint=fingerprint,
        local=starts[start],
        init_obj=scored[start],
        start=start,
        best=(scored[start], None),
    )


def _staged(
    prepared: GraphModule,
    dims: list[ScaleDim],
    config: SearchConfig,
    evaluate: _Evaluator,
    state: SearchState,
    ckpt_path: Path | None,
) -> None:
    """The staged search (esc_ao.search.staged) from the local step's scales; its result,
    as log-offsets from them, becomes the flat search's starting mean. Checkpointed after
    every stage: a resumed run rebuilds the finished stages' caches and goes on."""
    stages = plan_stages(prepared, dims, config.stages)
    search = StagedSearch(prepared, dims, stages, evaluate.shard, evaluate.objective, evaluate.refs, evaluate.cluster)
    scales = list(state.stage_scales or state.local)
    log.info(
        "ESC staged search: %d stages (%s scales), %d generations each",
        len(stages),
        "/".join(str(len(s.dims)) for s in stages),
        config.stage_budget,
    )
    _set_scales(dims, scales)
    for k in range(state.stages_done):  # resumed: the finished stages' caches
        search.advance(k)
    from tqdm.auto import tqdm

    searched = [k for k, s in enumerate(stages) if s.dims]
    bar = tqdm(
        total=len(searched) * config.stage_budget,
        initial=sum(k < state.stages_done for k in searched) * config.stage_budget,
        desc="ESC stages",
        unit="gen",
        disable=not (config.progress and evaluate.cluster.is_driver),
    )

    def on_generation(generation: int, values: list[float]) -> None:
        finite = [v for v in values if math.isfinite(v)]
        bar.set_postfix(stage=f"{k + 1}/{len(stages)}", best=f"{min(finite):.4g}" if finite else "nan")
        bar.update(1)

    for k in range(state.stages_done, len(stages)):
        ids = stages[k].dims
        if ids:
            found, before, after = search.search_stage(k, [scales[i] for i in ids], config, on_generation)
            for i, v in zip(ids, found):
                scales[i] = v
            log.info("ESC stage %d/%d: %d scales, objective %.6g -> %.6g", k + 1, len(stages), len(ids), before, after)
            boundary = stages[k].boundary
            state.stage_log.append(
                {
                    "stage": k + 1,
                    "scales": len(ids),
                    "ends_at": boundary.name if boundary is not None else "output",
                    "objective_start": before,
                    "objective_final": after,
                }
            )
        search.advance(k)
        state.stage_scales, state.stages_done = list(scales), k + 1
        if ckpt_path is not None and evaluate.cluster.is_driver:
            save_checkpoint(ckpt_path, asdict(state))
    bar.close()
    state.evaluations += search.evaluations
    offsets = [math.log(s / s0) for s, s0 in zip(scales, state.local)]
    state.staged, state.x_mean = offsets, np.asarray(offsets, dtype=float)
    # The flat search's "best" must know the staged point's value; without a flat search
    # the staged point is the result and is scored once, by the caller.
    if config.budget > 0:
        value = evaluate(scales)
        state.evaluations += 1
        log.info("ESC staged search: objective %.6g (local step %.6g)", value, state.init_obj)
        if math.isfinite(value) and value < state.best[0]:
            state.best = (value, np.asarray(offsets, dtype=float))
    if ckpt_path is not None and evaluate.cluster.is_driver:
        save_checkpoint(ckpt_path, asdict(state))


def _search(
    evaluate: _Evaluator,
    config: SearchConfig,
    state: SearchState,
    to_scales: Any,
    ckpt_path: Path | None,
    probe_batch: Batch,
) -> None:
    """CMA-ES generations until the budget; rank 0 asks and tells, every rank evaluates."""
    from tqdm.auto import tqdm

    cluster = evaluate.cluster
    es = None
    if cluster.is_driver:
        x0 = np.zeros(len(evaluate.dims)) if state.staged is None else np.asarray(state.staged, dtype=float)
        es = cma.CMAEvolutionStrategy(x0, config.sigma0, cma_options(config, config.budget))
        if state.es is not None:  # resume: pycma's state into the fresh object, then the RNG it samples from
            restore_object(es, state.es, "cma")
            es.timer = cma.utilities.utils.ElapsedWCTime()  # wall clock only; pycma makes it in the first ask
            np.random.set_state(state.np_rng)
    done = len(state.history)
    bar = tqdm(
        total=config.budget, initial=done, desc="ESC", unit="gen", disable=not (config.progress and cluster.is_driver)
    )
    while True:
        candidates = es.ask() if es is not None and es.countiter < config.budget else None
        candidates = cluster.broadcast(candidates)
        if candidates is None:
            break
        generation = len(state.history) + 1
        pick = generation_batches(len(evaluate.shard), config, (0, generation))
        values = [evaluate(to_scales(x), pick) for x in candidates]
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            raise NonFiniteObjectiveError(
                f"every candidate of generation {generation} gave a non-finite objective; first "
                f"non-finite node: {_first_nonfinite(evaluate.prepared, probe_batch)}"
            )
        for x, v in zip(candidates, values):
            if not math.isfinite(v):
                log.warning("ESC: candidate with non-finite objective penalised (generation %d)", generation)
            elif v < state.best[0]:
                state.best = (float(v), np.asarray(x, dtype=float).copy())
        state.evaluations += len(candidates)
        sigma = math.nan
        if es is not None:
            es.tell(candidates, [v if math.isfinite(v) else PENALTY for v in values])
            state.x_mean, sigma = np.asarray(es.mean, dtype=float).copy(), float(es.sigma)
        state.history.append(
            {
                "generation": generation,
                "best": min(finite),
                "mean": float(np.mean(finite)),
                "sigma": sigma,
                "evaluations": state.evaluations,
            }
        )
        bar.set_postfix(best=f"{min(finite):.4g}", mean=f"{np.mean(finite):.4g}", sigma=f"{sigma:.3g}")
        bar.update(1)
        if ckpt_path is not None and es is not None:
            state.es, state.np_rng = object_state(es, "cma"), np.random.get_state()
            save_checkpoint(ckpt_path, asdict(state))
    bar.close()
    state.x_mean = cluster.broadcast(state.x_mean)
