"""The accuracy benchmark: every calibration method at W8A8, W4A8 and W4A4 on the trained
speech models, against their float rows.

    esc-ao bench accuracy [--models ...] [--eval-sets real tts] [--methods max ... esc] [--bits w8a8 w4a8 w4a4]

Each cell (model, evaluation set, method, bits) is one JSON file in the cell folder (default
docs/results/accuracy_cells), keyed as esc_ao.bench.cells says (calibration count, seed,
ESC's search settings, declared numerics versions, packages, weights, data); a cell that
exists is read, not recomputed, so a long table is built over several runs and an
interrupted run loses at most the cell in flight.
After every cell the outputs are rewritten (esc_ao.bench.accuracy_table).

Quantized graphs are EscQuantizer(target="reference") unless a recipe says +xnn: full
integer quantization (linear, conv, attention matmuls, residual adds, LayerNorm in/out),
evaluated as the converted reference graph (integer grids, float arithmetic between them), made fast to run by
esc_ao.eval_graph.for_evaluation (bit-identical outputs).

A method may carry a recipe suffix (esc_ao.recipe), e.g. ``mse+r16+sq``: the same
calibration with the residual stream on a 16-bit grid and LayerNorm smoothing; its cells
are keyed with the recipes' numerics version too.

Method "dynamic" is the users' alternative to calibration, dynamic int8 activations
(esc_ao.bench.dynamic: torchao on the float model's linears only): it has W8A8 and W4A8
cells; W4A4 does not exist for it and is skipped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from esc_ao.atomic import write_json_atomic
from esc_ao.bench import cells as cellkeys
from esc_ao.bench.accuracy_table import render
from esc_ao.bench.cells import BITS, EVAL_SETS, KEY_KINDS, MODEL_EVAL_SETS, MODELS, AccuracySettings, key_kind
from esc_ao.bench.dynamic import BENCH_METHODS, DYNAMIC_BITS, DYNAMIC_METHOD, dynamic_forwards, dynamic_sizes
from esc_ao.bench.machine import describe
from esc_ao.bench.tasks import Part, Task, build_task, load_eval_corpus
from esc_ao.config import QuantConfig, SearchConfig
from esc_ao.eval_graph import for_evaluation
from esc_ao.pipeline import Batch, convert, export_model
from esc_ao.recipe import Recipe, split_method
from esc_ao.report import weight_bytes
from esc_ao.search.calibrate import calibrate

__all__ = ["BENCH_METHODS", "AccuracySettings", "QuantizedTask", "quantize_task", "render", "run_accuracy_bench"]


@dataclass
class QuantizedTask:
    """A task's converted graphs (one per part, ready for ``task.evaluate``) and what
    quantizing them took."""

    forwards: dict[str, Any]
    float_bytes: int  # the quantized parts' weights in float32
    quant_bytes: int  # the same weights quantized
    esc: list[dict[str, Any]]  # one search summary per part (ESC only)
    seconds: float
    transforms: list[dict[str, Any]]  # what the recipe's transforms did, per part and site
    plans: list[dict[str, Any]]  # the recipe's precision plan per part (with a budget only)


def quantize_task(
    task: Task,
    config: QuantConfig,
    search: SearchConfig | None,
    exported: dict[str, GraphModule],
    recipe: Recipe = Recipe(),
) -> QuantizedTask:
    """Quantizes the task's parts in order, each calibrated on what the quantized parts
    before it produce. ``search``: ESC's settings (``config.method == "esc"``; each part's
    ``local_batches`` replaces the one given). ``exported``: each part's float graph,
    exported on first use and copied for every call (prepare rewrites the graph it is
    given; export takes seconds to a minute). ``recipe``: transforms applied to each
    part's copy before annotation, and the residual stream's precision."""
    t0 = time.perf_counter()
    converted: dict[str, Any] = {}
    float_bytes = quant_bytes = 0
    esc: list[dict[str, Any]] = []
    transforms: list[dict[str, Any]] = []
    plans: list[dict[str, Any]] = []
    for part in task.parts:
        batches = part.calibration(converted)
        if part.name not in exported:
            exported[part.name] = export_model(part.model, batches[0], part.dynamic_shapes)
        ready = recipe.prepare(copy.deepcopy(exported[part.name]), batches, config)
        prepared = ready.model
        transforms += [{"part": part.name, **dataclasses.asdict(r)} for r in ready.transforms]
        if ready.plan is not None:
            plans.append({"part": part.name, "summary": ready.plan.summary(), **ready.plan.to_dict()})
        if config.method == "esc":
            esc.append(
                _search_part(
                    prepared,
                    batches,
                    part,
                    converted,
                    dataclasses.replace(search or SearchConfig(), local_batches=part.local_batches),
                )
            )
        sizes = weight_bytes(prepared)
        float_bytes, quant_bytes = float_bytes + sizes["float32_bytes"], quant_bytes + sizes["quantized_bytes"]
        converted[part.name] = for_evaluation(convert(prepared))  # same numbers, 2x faster
    return QuantizedTask(converted, float_bytes, quant_bytes, esc, time.perf_counter() - t0, transforms, plans)


def _search_part(
    prepared: GraphModule, batches: list[Batch], part: Part, converted: dict[str, Any], search: SearchConfig
) -> dict[str, Any]:
    """ESC on one part: searched on ``part.search``'s batches, checked on ``part.holdout``'s."""
    held = list(part.holdout)
    result = calibrate(
        prepared,
        [batches[i] for i in part.search],
        part.objective(converted, part.search),
        search,
        holdout=[batches[i] for i in held] if held else None,
        holdout_objective=part.objective(converted, held) if held else None,
    )
    return {
        "part": part.name,
        "objective_start": result.initial_objective,
        "objective_final": result.final_objective,
        "holdout_start": result.holdout_start,
        "holdout_final": result.holdout_final,
        "improved": result.improved,
        "evaluations": result.evaluations,
        "scales": len(result.labels),
        "search_batches": len(part.search),
        "holdout_batches": len(held),
        "local_batches": search.local_batches,
        "seconds": round(result.wall_seconds, 1),
        "message": result.message,
    }


def _details(est: Any) -> dict[str, Any]:
    """The estimate's make-up (WER's error counts, Whisper's transcripts), when it has one."""
    return {"details": est.details} if est.details else {}


def _float_cell(task: Task) -> dict[str, Any]:
    t0 = time.perf_counter()
    with torch.no_grad():
        est = task.evaluate(task.float_forwards())
    return {
        "method": "float",
        "bits": "fp32",
        "value": est.value,
        "ci95_low": est.low,
        "ci95_high": est.high,
        "n": est.n,
        **_details(est),
        "size_bytes": 4 * task.n_params,
        "calibration_seconds": 0.0,
        "eval_seconds": round(time.perf_counter() - t0, 1),
    }


def _dynamic_cell(task: Task, bits: str) -> dict[str, Any]:
    """One dynamic-activation cell: the float parts with torchao-quantized linears, then the
    test metric; calibration_seconds is the time quantizing took (nothing is calibrated)."""
    t0 = time.perf_counter()
    forwards = dynamic_forwards(task, bits)
    sizes = dynamic_sizes(task, bits)
    t1 = time.perf_counter()
    with torch.no_grad():
        est = task.evaluate(forwards)
    return {
        "method": DYNAMIC_METHOD,
        "bits": bits,
        "value": est.value,
        "ci95_low": est.low,
        "ci95_high": est.high,
        "n": est.n,
        **_details(est),
        "size_bytes": 4 * task.n_params - sizes.float_bytes + sizes.quant_bytes,
        "calibration_seconds": round(t1 - t0, 1),
        "eval_seconds": round(time.perf_counter() - t1, 1),
        "dynamic": {"linears_per_channel": sizes.per_channel, "linears_per_group": sizes.per_group},
    }


def _quant_cell(
    task: Task, method: str, bits: str, settings: AccuracySettings, exported: dict[str, GraphModule]
) -> dict[str, Any]:
    """One quantized cell: quantize_task, then the test metric of its converted graphs."""
    if method == DYNAMIC_METHOD:
        return _dynamic_cell(task, bits)
    base, recipe = split_method(method)
    config = QuantConfig.from_label(bits, method=base)
    search = SearchConfig(
        budget=settings.budget,
        popsize=settings.popsize,
        sigma0=settings.sigma0,
        seed=settings.seed,
        progress=False,
        stages=settings.stages,
        stage_budget=settings.stage_budget,
    )
    q = quantize_task(task, config, search, exported, recipe)
    t1 = time.perf_counter()
    with torch.no_grad():
        est = task.evaluate(q.forwards)
    row = {
        "method": method,
        "bits": bits,
        "value": est.value,
        "ci95_low": est.low,
        "ci95_high": est.high,
        "n": est.n,
        **_details(est),
        "size_bytes": 4 * task.n_params - q.float_bytes + q.quant_bytes,
        "calibration_seconds": round(q.seconds, 1),
        "eval_seconds": round(time.perf_counter() - t1, 1),
    }
    if recipe != Recipe():
        row["recipe"] = {
            "suffix": recipe.suffix,
            "description": recipe.describe(),
            "transforms": q.transforms,
            **({"precision_plans": q.plans} if q.plans else {}),
        }
    if q.esc:
        row["esc"] = q.esc
        row["esc_search"] = {"budget": settings.budget, "popsize": settings.popsize, "sigma0": settings.sigma0}
        if settings.stages > 1:
            row["esc_search"].update(stages=settings.stages, stage_budget=settings.stage_budget)
    return row


def run_accuracy_bench(
    models: list[str],
    methods: list[str],
    bits: list[str],
    out: Path,
    cells: Path,
    settings: AccuracySettings,
    eval_sets: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Fills the missing cells of models x evaluation sets x (float + methods x bits; no
    "dynamic" W4A4, which does not exist), then writes the JSON, Markdown and plot over
    every cell present for the current keys.
    ``eval_sets``: "real" and/or "tts" (default: each model's own, esc_ao.bench.cells)."""
    for method in methods:
        _check_method(method)
    for name, given, valid in (
        ("model", models, MODELS),
        ("bits", bits, BITS),
        ("evaluation set", eval_sets or [], EVAL_SETS),
    ):
        bad = [g for g in given if g not in valid]
        if bad:
            raise ValueError(f"unknown {name} {', '.join(map(repr, bad))}: use one of {', '.join(valid)}")
    wanted = {m: [e for e in MODEL_EVAL_SETS[m] if eval_sets is None or e in eval_sets] for m in models}
    for model, sets in wanted.items():  # before any cell: a typo must not cost a finished cell's time
        if not sets:
            raise ValueError(
                f"model {model!r} has no evaluation set {', '.join(eval_sets or [])}: "
                f"use one of {', '.join(MODEL_EVAL_SETS[model])}"
            )
    for model, sets in wanted.items():
        for eval_set in sets:
            _fill(model, eval_set, methods, bits, out, cells, settings)
    return render(out, cells, settings)


def _check_method(method: str) -> None:
    """A calibration method with an optional recipe suffix, or "dynamic" alone."""
    base, recipe = split_method(method)
    if base not in BENCH_METHODS or (base == DYNAMIC_METHOD and recipe != Recipe()):
        raise ValueError(
            f"unknown method {method!r}: use one of {', '.join(BENCH_METHODS)}, a calibration method "
            f"with a recipe suffix such as mse+r16+sq (esc_ao.recipe; not on {DYNAMIC_METHOD})"
        )


def _fill(
    model: str, eval_set: str, methods: list[str], bits: list[str], out: Path, cells: Path, settings: AccuracySettings
) -> None:
    """The missing cells of one model on one evaluation set."""
    load_eval_corpus(model, eval_set)  # verified (rebuilt if stale) before anything is computed on it
    keys = {kind: cellkeys.cell_key(model, kind, eval_set) for kind in KEY_KINDS}
    task: Task | None = None
    exported: dict[str, GraphModule] = {}
    cells_wanted = [(m, b) for b in bits for m in methods if m != DYNAMIC_METHOD or b in DYNAMIC_BITS]
    for method, b in [("float", "fp32")] + cells_wanted:
        key = keys[key_kind(method)]
        path = cellkeys.cell_path(cells, model, eval_set, method, b, settings, key.digest)
        if path.exists():
            continue
        if task is None:
            task = build_task(model, settings.n_calibration, settings.seed, eval_set)
        row = _float_cell(task) if method == "float" else _quant_cell(task, method, b, settings, exported)
        row.update(
            model=model,
            eval_set=eval_set,
            metric=task.metric,
            seed=settings.seed,
            version=key.digest,
            key=dataclasses.asdict(key),
            n_calibration=settings.n_calibration,
            machine=describe(),
            notes=task.notes,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("notes", "key")}), flush=True)
        render(out, cells, settings)  # the table so far: a stopped run still leaves one
