"""The accuracy benchmark: every calibration method at W8A8, W4A8 and W4A4 on the trained
speech models, against their float rows.

    esc-ao bench accuracy [--models conformer-ctc ast] [--methods max ... esc] [--bits w8a8 w4a8 w4a4]

Each cell (model, method, bits, seed, code version) is one JSON file in the cell folder
(default docs/results/accuracy_cells); a cell that exists is read, not recomputed, so a long
table is built over several runs and an interrupted run loses at most the cell in flight.
The code version is a hash of the sources that decide the numbers (quantizer, observers,
calibration, features, the bench itself), of the model's own task code and trained weights,
and of the content of its corpus's calibration and test splits (texts, labels, audio
hashes; not the builder's code, so a change in how corpora are built keeps the cells while
any change of audio recomputes them): changing shared code recomputes every cell,
retraining one model only that model's cells.

Outputs (written atomically): ``accuracy.json`` (one record per cell: model, method, bits,
metric, value with its 95 % interval, size_bytes, calibration_seconds, ...),
``accuracy.md`` (the table with the command, machine and wall times) and ``accuracy.png``
(metric against bits, one line per method, one panel per model).

Quantized graphs are EscQuantizer(target="reference"): full integer quantization (linear,
conv, attention matmuls, residual adds, LayerNorm in/out), evaluated as the converted
reference graph (integer grids, float arithmetic between them), made fast to run by
esc_ao.eval_graph.for_evaluation (bit-identical outputs).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from esc_ao.bench.tasks import Task, build_task
from esc_ao.calibrate import calibrate
from esc_ao.corpus import built_digest, load_corpus
from esc_ao.eval_graph import for_evaluation
from esc_ao.config import METHODS, QuantConfig, SearchConfig
from esc_ao.pipeline import convert, export_model, observe, prepare
from esc_ao.quantizer import EscQuantizer
from esc_ao.report import weight_bytes, write_json_atomic, write_text_atomic

__all__ = ["BITS", "MODELS", "MODEL_CORPUS", "AccuracySettings", "code_version", "render", "run_accuracy_bench"]

log = logging.getLogger(__name__)

MODELS = ("whisper-tiny.en", "conformer-ctc", "ast")
BITS = ("w8a8", "w4a8", "w4a4")
# Sources that decide every cell's numbers (relative to the esc_ao package), and those
# that decide one model's: its task code and its trained weights.
_NUMERIC_SOURCES = ("annotators.py", "calibrate.py", "config.py", "graph_prep.py", "histogram.py", "local_step.py",
                    "metrics.py", "objectives.py", "observers.py", "pipeline.py", "quantizer.py", "search_space.py",
                    "speech/features.py", "bench/accuracy.py", "bench/tasks.py", "eval_graph.py")
_MODEL_SOURCES = {
    "whisper-tiny.en": ("bench/whisper_task.py", "speech/whisper.py", "speech/ct2_whisper.py"),
    "conformer-ctc": ("speech/conformer.py", "speech/attention.py", "speech/pretrained.py",
                      "data/models/conformer_ctc.pt"),
    "ast": ("speech/ast.py", "speech/pretrained.py", "data/models/ast.pt"),
}
MODEL_CORPUS = {"whisper-tiny.en": "asr", "conformer-ctc": "asr", "ast": "kws"}
_EVAL_SPLITS = ("calibration", "test")


@dataclass(frozen=True)
class AccuracySettings:
    """How cells are computed. ``budget``/``popsize``: ESC's CMA-ES generations and
    population; the other fields are the paper's."""

    n_calibration: int = 100
    seed: int = 0
    budget: int = 30
    popsize: int | None = 8
    sigma0: float = 0.1


def code_version(model: str) -> str:
    """Hash (12 hex digits) of the shared sources, ``model``'s own (task code, weights) and
    its corpus's evaluation content: retraining one model recomputes its cells only.

    Raises:
        FileNotFoundError: the model's corpus is not built (the version depends on its audio).
    """
    digest = built_digest(MODEL_CORPUS[model], _EVAL_SPLITS)
    if digest is None:
        raise FileNotFoundError(f"corpus {MODEL_CORPUS[model]!r} (used by {model}) is not built: "
                                f"run `esc-ao corpus {MODEL_CORPUS[model]}` first")
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(digest.encode())
    for rel in _NUMERIC_SOURCES + _MODEL_SOURCES[model]:
        path = root / rel
        files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts) if path.is_dir() \
            else [path] if path.exists() else []
        for f in files:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _cell_path(cells: Path, model: str, method: str, bits: str, settings: AccuracySettings, version: str) -> Path:
    """One cell's file: keyed by model, method, bits, calibration count, seed, code version."""
    return cells / model / f"{method}-{bits}-n{settings.n_calibration}-s{settings.seed}-{version}.json"


def _float_cell(task: Task) -> dict[str, Any]:
    t0 = time.perf_counter()
    with torch.no_grad():
        est = task.evaluate(task.float_forwards())
    return {"method": "float", "bits": "fp32", "value": est.value, "ci95_low": est.low, "ci95_high": est.high,
            "n": est.n, "size_bytes": 4 * task.n_params, "calibration_seconds": 0.0,
            "eval_seconds": round(time.perf_counter() - t0, 1)}


def _quant_cell(task: Task, method: str, bits: str, settings: AccuracySettings,
                exported: dict[str, GraphModule]) -> dict[str, Any]:
    """Quantizes the task's parts in order (each calibrated on what the quantized parts
    before it produce), then evaluates the converted graphs on the test split.
    ``exported``: each part's float graph, exported on first use and copied for every
    cell (prepare rewrites the graph it is given; export takes seconds to a minute)."""
    config = QuantConfig(weight_bits=int(bits[1]), act_bits=int(bits[3]), method=method)
    t0 = time.perf_counter()
    converted: dict[str, Any] = {}
    float_bytes = quant_bytes = 0
    esc: list[dict[str, Any]] = []
    for part in task.parts:
        batches = part.calibration(converted)
        if part.name not in exported:
            exported[part.name] = export_model(part.model, batches[0], part.dynamic_shapes)
        prepared = prepare(copy.deepcopy(exported[part.name]), EscQuantizer(config, target="reference"))
        observe(prepared, batches)
        if method == "esc":
            search = SearchConfig(budget=settings.budget, popsize=settings.popsize, sigma0=settings.sigma0,
                                  seed=settings.seed, progress=False)
            result = calibrate(prepared, batches[: part.search_batches], part.objective(converted), search)
            esc.append({"part": part.name, "objective_start": result.initial_objective,
                        "objective_final": result.final_objective, "evaluations": result.evaluations,
                        "scales": len(result.labels), "search_batches": len(batches[: part.search_batches]),
                        "seconds": round(result.wall_seconds, 1), "message": result.message})
        sizes = weight_bytes(prepared, config.weight_bits)
        float_bytes, quant_bytes = float_bytes + sizes["float32_bytes"], quant_bytes + sizes["quantized_bytes"]
        converted[part.name] = for_evaluation(convert(prepared))  # same numbers, 2x faster
    calib_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    with torch.no_grad():
        est = task.evaluate(converted)
    row = {"method": method, "bits": bits, "value": est.value, "ci95_low": est.low, "ci95_high": est.high,
           "n": est.n, "size_bytes": 4 * task.n_params - float_bytes + quant_bytes,
           "calibration_seconds": round(calib_s, 1), "eval_seconds": round(time.perf_counter() - t1, 1)}
    if esc:
        row["esc"] = esc
        row["esc_search"] = {"budget": settings.budget, "popsize": settings.popsize, "sigma0": settings.sigma0}
    return row


def run_accuracy_bench(models: list[str], methods: list[str], bits: list[str], out: Path, cells: Path,
                       settings: AccuracySettings) -> list[dict[str, Any]]:
    """Fills the missing cells of models x (float + methods x bits), then writes the
    JSON, Markdown and plot over every cell present for the current code version."""
    for name, given, valid in (("model", models, MODELS), ("method", methods, METHODS), ("bits", bits, BITS)):
        bad = [g for g in given if g not in valid]
        if bad:
            raise ValueError(f"unknown {name} {', '.join(map(repr, bad))}: use one of {', '.join(valid)}")
    for model in models:
        load_corpus(MODEL_CORPUS[model])  # verified (rebuilt if stale) before its digest keys the cells
        version = code_version(model)
        task: Task | None = None
        exported: dict[str, GraphModule] = {}
        for method, b in [("float", "fp32")] + [(m, b) for b in bits for m in methods]:
            path = _cell_path(cells, model, method, b, settings, version)
            if path.exists():
                continue
            if task is None:
                task = build_task(model, settings.n_calibration, settings.seed)
            row = _float_cell(task) if method == "float" else _quant_cell(task, method, b, settings, exported)
            row.update(model=model, metric=task.metric, seed=settings.seed, code_version=version,
                       n_calibration=settings.n_calibration, machine=_machine(), notes=task.notes)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, row)
            print(json.dumps({k: v for k, v in row.items() if k != "notes"}), flush=True)
            render(out, cells, settings)  # the table so far: a stopped run still leaves one
    return render(out, cells, settings)


def render(out: Path, cells: Path, settings: AccuracySettings) -> list[dict[str, Any]]:
    """Writes the JSON, Markdown and plot from the cells present (computes nothing)."""
    rows = _collect(cells, settings)
    _write_outputs(rows, out, settings)
    return rows


def _machine() -> str:
    return f"{platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _versions() -> dict[str, str]:
    """Each model's current code version; models whose corpus is not built are left out
    (their cells cannot be matched: a warning says so)."""
    versions = {}
    for model in MODELS:
        try:
            versions[model] = code_version(model)
        except FileNotFoundError as exc:
            log.warning("%s: its cells are left out of the table", exc)
    return versions


def _collect(cells: Path, settings: AccuracySettings) -> list[dict[str, Any]]:
    """Every cell present for these settings and each model's current code version."""
    rows = []
    for model, version in _versions().items():
        pattern = f"*-n{settings.n_calibration}-s{settings.seed}-{version}.json"
        rows += [json.loads(p.read_text()) for p in sorted((cells / model).glob(pattern))]
    order = {m: i for i, m in enumerate(("float", *METHODS))}
    return sorted(rows, key=lambda r: (MODELS.index(r["model"]), ("fp32", *BITS).index(r["bits"]), order[r["method"]]))


def _fmt(r: dict[str, Any]) -> str:
    scale = 100.0
    return f"{scale * r['value']:.2f} [{scale * r['ci95_low']:.2f}, {scale * r['ci95_high']:.2f}]"


def _write_outputs(rows: list[dict[str, Any]], out: Path, settings: AccuracySettings) -> None:
    out.mkdir(parents=True, exist_ok=True)
    versions = _versions()
    write_json_atomic(out / "accuracy.json", {"settings": asdict(settings), "code_versions": versions, "rows": rows})
    machines = sorted({r.get("machine", "?") for r in rows})
    lines = ["# Accuracy benchmark: calibration methods x bit widths", "",
             f"Command: `bash scripts/bench_accuracy.sh --calib-samples {settings.n_calibration} --seed {settings.seed} "
             f"--budget {settings.budget} --popsize {settings.popsize}` (cells cached per model, method, bits, seed, "
             f"code version). Machine: {'; '.join(machines)}.", "",
             f"Code versions {', '.join(f'{m} {v}' for m, v in versions.items())}; "
             f"{settings.n_calibration} calibration utterances (seed {settings.seed}); "
             f"ESC: local MSE step + CMA-ES, {settings.budget} generations x population {settings.popsize}, "
             f"sigma0 {settings.sigma0}, final = mean of the last distribution. Values in %, with 95 % intervals "
             "(WER: utterance bootstrap; accuracy: Wilson). Full integer quantization (EscQuantizer, reference target).",
             ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        metric = mrows[0]["metric"]
        wall = sum(r["calibration_seconds"] + r.get("eval_seconds", 0.0) for r in mrows)
        lines += [f"## {model} ({'WER, lower is better' if metric == 'wer' else 'accuracy, higher is better'})", "",
                  f"{len(mrows)} cells, {wall / 60:.0f} min of calibration and evaluation in all.", "",
                  "| bits | method | " + metric + " % | size MB | calibration s | eval s |", "|---|---|---|---|---|---|"]
        for r in mrows:
            lines.append(f"| {r['bits']} | {r['method']} | {_fmt(r)} | {r['size_bytes'] / 1e6:.2f} | "
                         f"{r['calibration_seconds']:.0f} | {r.get('eval_seconds', 0):.0f} |")
        lines.append("")
    write_text_atomic(out / "accuracy.md", "\n".join(lines))
    _plot(rows, out / "accuracy.png")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from esc_ao.atomic import atomic_path

    models = list(dict.fromkeys(r["model"] for r in rows))
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    xs = list(BITS)
    for ax, model in zip(axes[0], models):
        mrows = [r for r in rows if r["model"] == model]
        for method in METHODS:
            pts = [(xs.index(r["bits"]), 100 * r["value"]) for r in mrows if r["method"] == method]
            if pts:
                ax.plot(*zip(*sorted(pts)), marker="o", label=method)
        fl = [r for r in mrows if r["method"] == "float"]
        if fl:
            ax.axhline(100 * fl[0]["value"], color="k", ls="--", lw=1, label="float")
        ax.set_xticks(range(len(xs)), xs)
        ax.set_title(model)
        ax.set_ylabel(f"{mrows[0]['metric']} %")
        if mrows[0]["metric"] == "wer":
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
