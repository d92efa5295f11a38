"""The accuracy benchmark's outputs, rendered from the cells present (computes nothing):
``accuracy.json`` (one record per cell), ``accuracy.md`` (the table with the command,
machine and wall times; a column per evaluation set, real speech first) and
``accuracy.png`` (metric against bits, one line per method, one panel per model and
evaluation set). Kept apart from the cell computation: the layout is not part of any key."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from esc_ao.atomic import write_json_atomic, write_text_atomic
from esc_ao.bench import cells as cellkeys
from esc_ao.bench.cells import BITS, EVAL_SETS, KEY_KINDS, MODEL_EVAL_SETS, MODELS, AccuracySettings, key_kind
from esc_ao.bench.dynamic import BENCH_METHODS, DYNAMIC_METHOD
from esc_ao.bench.numerics import NUMERICS

__all__ = ["TABLE_METHODS", "render", "stale_cells"]

# The table's rows per bit width, in order: each calibration method plain, then with the
# recipes (esc_ao.recipe) the benchmark computes, then the dynamic-activation baseline.
TABLE_RECIPES = ("", "+r16", "+r16+sq", "+r16+sq+gptq", "+r16+sq+gptq+mp10", "+xnn", "+xnn+rf+sq", "+xnn+rf+sq+gptq")
TABLE_METHODS: tuple[str, ...] = tuple(m + r for r in TABLE_RECIPES for m in BENCH_METHODS if m != DYNAMIC_METHOD) + (
    DYNAMIC_METHOD,
)

log = logging.getLogger(__name__)


def render(out: Path, cells: Path, settings: AccuracySettings) -> list[dict[str, Any]]:
    """Writes the JSON, Markdown and plot from the cells present (computes nothing)."""
    versions = _versions()  # hashes the trained weights and corpus plans: once per render
    rows = _collect(cells, settings, versions)
    _write_outputs(rows, out, settings, versions, len(stale_cells(cells, versions)))
    return rows


def _versions() -> dict[tuple[str, str], dict[str, str]]:
    """Each (model, evaluation set)'s current version digest per key kind
    (esc_ao.bench.cells.KEY_KINDS); a pair whose
    key cannot be computed here (a TTS engine missing) is left out with a warning: its cells
    are neither shown nor judged."""
    versions = {}
    for model in MODELS:
        for eval_set in MODEL_EVAL_SETS[model]:
            try:
                versions[(model, eval_set)] = {kind: cellkeys.code_version(model, kind, eval_set) for kind in KEY_KINDS}
            except (ImportError, OSError, RuntimeError) as exc:  # a missing TTS engine, weights package or module
                log.warning("%s on %s: its cells are left out of the table (%s)", model, eval_set, exc)
    return versions


def _version(versions: dict[str, str], method: str) -> str:
    return versions[key_kind(method)]


def stale_cells(cells: Path, versions: dict[tuple[str, str], dict[str, str]] | None = None) -> list[Path]:
    """Cell files whose key is no longer current (older numerics versions, packages,
    weights or data; any settings). Pairs whose key cannot be computed here are never
    judged stale."""
    versions = _versions() if versions is None else versions
    return sorted(
        path
        for (model, eval_set), current in versions.items()
        for path in (cells / model / eval_set).glob("*.json")
        if not path.stem.endswith(tuple(f"-{v}" for v in current.values()))
    )


def _collect(
    cells: Path, settings: AccuracySettings, versions: dict[tuple[str, str], dict[str, str]]
) -> list[dict[str, Any]]:
    """Every cell present for these settings and the current keys, in table order (per
    model: float first, then bits x methods; evaluation sets real first); methods outside
    TABLE_METHODS (other recipes) follow the listed ones."""
    rows = []
    for (model, eval_set), current in versions.items():
        found = []
        for path in (cells / model / eval_set).glob("*.json"):
            method, bits = path.stem.split("-")[:2]
            cell = json.loads(path.read_text())
            # ESC cells of every search setting are shown, each labelled with its search
            own = _with_search(settings, cell.get("esc_search"))
            if path == cellkeys.cell_path(cells, model, eval_set, method, bits, own, _version(current, method)):
                found.append((method, bits, {**cell, "label": method + _search_label(cell.get("esc_search"))}))
        for _, _, cell in sorted(found, key=lambda f: (_order(f[0], f[1]), f[2]["label"])):
            rows.append(cell)
    return rows


def _with_search(settings: AccuracySettings, search: dict[str, Any] | None) -> AccuracySettings:
    if not search:
        return settings
    return dataclasses.replace(settings, **{k: v for k, v in search.items() if hasattr(settings, k)})


def _search_label(search: dict[str, Any] | None) -> str:
    """How an ESC cell searched: the local step only, N flat generations, or stages."""
    if not search:
        return ""
    parts = []
    if search.get("stages", 1) > 1:
        parts.append(f"{search['stages']} stages x {search['stage_budget']} gen")
    if search["budget"] or not parts:
        parts.append(f"{search['budget']} gen" if search["budget"] else "local step")
    return " (" + ", ".join(parts) + ")"


def _order(method: str, bits: str) -> tuple[int, int, str]:
    """Table position: float first, then by bits, then TABLE_METHODS' order, then by name."""
    if method == "float":
        return (-1, -1, "")
    base = method.split(" (")[0]  # a label names the search after the method
    listed = TABLE_METHODS.index(base) if base in TABLE_METHODS else len(TABLE_METHODS)
    return (BITS.index(bits) if bits in BITS else len(BITS), listed, method)


def _methods(rows: list[dict[str, Any]]) -> list[str]:
    """The methods of these rows other than float, in table order."""
    present = {r["label"] for r in rows} - {"float"}
    return sorted(present, key=lambda m: _order(m, BITS[0])[1:])


def _fmt(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    return f"{100 * r['value']:.2f} [{100 * r['ci95_low']:.2f}, {100 * r['ci95_high']:.2f}]"


_SET_TITLES = {"real": "real speech", "tts": "TTS"}


def _model_table(model: str, mrows: list[dict[str, Any]]) -> list[str]:
    """One model's section: a row per (bits, method), a column per evaluation set."""
    metric = mrows[0]["metric"]
    sets = [e for e in EVAL_SETS if any(r["eval_set"] == e for r in mrows)]
    wall = sum(r["calibration_seconds"] + r.get("eval_seconds", 0.0) for r in mrows)
    sizes = {e: next((r["n"] for r in mrows if r["eval_set"] == e), 0) for e in sets}
    lines = [
        f"## {model} ({'WER, lower is better' if metric == 'wer' else 'accuracy, higher is better'})",
        "",
        f"{len(mrows)} cells, {wall / 60:.0f} min of calibration and evaluation in all. Test sets: "
        + "; ".join(f"{_SET_TITLES[e]} {sizes[e]} {'utterances' if metric == 'wer' else 'clips'}" for e in sets)
        + ".",
        "",
        "| bits | method | " + " | ".join(f"{_SET_TITLES[e]} {metric} %" for e in sets) + " | size MB |",
        "|---|---|" + "---|" * len(sets) + "---|",
    ]
    by = {(r["eval_set"], r["label"], r["bits"]): r for r in mrows}
    for method, bits in [("float", "fp32")] + [(m, b) for b in BITS for m in _methods(mrows)]:
        cols = [by.get((e, method, bits)) for e in sets]
        if not any(cols):
            continue
        size = next(c for c in cols if c)["size_bytes"]
        lines.append(f"| {bits} | {method} | " + " | ".join(_fmt(c) for c in cols) + f" | {size / 1e6:.2f} |")
    return lines + [""]


def _write_outputs(
    rows: list[dict[str, Any]],
    out: Path,
    settings: AccuracySettings,
    versions: dict[tuple[str, str], dict[str, str]],
    n_stale: int,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        out / "accuracy.json",
        {
            "settings": asdict(settings),
            "numerics": NUMERICS,
            "versions": {f"{m}/{e}": v for (m, e), v in versions.items()},
            "rows": rows,
        },
    )
    machines = sorted({r.get("machine", "?") for r in rows})
    lines = [
        "# Accuracy benchmark: calibration methods x bit widths",
        "",
        f"Command: `bash scripts/bench_accuracy.sh --calib-samples {settings.n_calibration} --seed {settings.seed} "
        "--methods METHOD --bits BITS [--budget G --popsize 8 --stages S --stage-budget G]` (cells cached per "
        f"model, evaluation set, method, bits, seed, ESC's search and key). Machines: {'; '.join(machines)}.",
        "",
        f"Numerics versions: {', '.join(f'{k} {v}' for k, v in NUMERICS.items())}. "
        f"{settings.n_calibration} calibration utterances (seed {settings.seed}); "
        "ESC: local MSE step, then CMA-ES (population 8, sigma0 0.1, final = mean of the last distribution); "
        "each ESC row names its search: the local step only, N flat generations, or S stages x G generations "
        "of the staged search (esc_ao.search.staged) before them. Values in %, with 95 % intervals "
        "(WER: utterance bootstrap; accuracy: Wilson). Calibration methods: full integer quantization "
        "(EscQuantizer, reference target). "
        "Recipe suffixes (esc_ao.recipe): +xnn, the XNNPACK target (linear, conv, add and mul as int8 "
        "kernels with int8 outputs, attention matmuls and softmax float, graph outputs float); +rf, the "
        "residual stream's adds and the LayerNorm inputs they feed in float, the linears writing it as dynamic "
        "int8 GEMMs; +gptq, GPTQ rounding of the linears' weights; +t8, tied output projections at 8-bit "
        "weights under 4-bit ones; +gN, group-wise linear weights (one scale per N input channels of each "
        "output channel, a float32 scale per group counted in the size); +mpN, mixed precision: the layer "
        "groups that cost the objective most per multiply-accumulate, within N % of them, raised (to float "
        "at W8A8, to W8A8 under 4 bits; "
        "esc_ao.precision); +r16, the residual stream (every add a LayerNorm reads, and "
        "those LayerNorms' inputs) on a 16-bit integer grid; +sq, SmoothQuant-style smoothing of every "
        "LayerNorm -> linear site, alpha per site from calibration data; +p16, the attention probabilities "
        "(softmax outputs a matmul reads) on a 16-bit grid; +c8, convolutions at 8-bit weights under 4-bit "
        "ones; +gptqa, GPTQ with act-order; +had / +hadN, Hadamard rotation of the residual stream (N: and "
        "of the MLP's second linear's input, online in blocks of N); +qk8 / +att8, the attention scores "
        "matmul / both attention matmuls as XNNPACK's int8 batch matmul (int8 inputs and output). "
        "Method dynamic, for comparison: no calibration, torchao's dynamic int8 activations (per token, "
        "asymmetric) on the linears only (W8A8: int8 weights per channel; W4A8: int4 weights in groups of 32, "
        "per channel where the input width is not a multiple of 32); convolutions, attention, LayerNorm and "
        "Whisper's output projection stay float; it has no W4A4 row (dynamic activations are 8-bit). "
        "Real speech: human recordings (esc_ao.corpus.real), calibrated on its calibration split and tested on "
        "its test split; TTS: the offline TTS corpora (docs/benchmark.md)."
        + (
            f" {n_stale} cells of older keys are not shown (`esc-ao bench accuracy --prune` deletes them)."
            if n_stale
            else ""
        ),
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        lines += _model_table(model, [r for r in rows if r["model"] == model])
    write_text_atomic(out / "accuracy.md", "\n".join(lines))
    _plot(rows, out / "accuracy.png")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from esc_ao.atomic import atomic_path

    models = list(dict.fromkeys((r["model"], r["eval_set"]) for r in rows))
    if not models:
        return
    ncols = min(4, len(models))
    nrows = -(-len(models) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 4 * nrows), squeeze=False)
    for ax in axes.flat[len(models) :]:
        ax.set_visible(False)
    xs = list(BITS)
    for ax, (model, eval_set) in zip(axes.flat, models):
        mrows = [r for r in rows if r["model"] == model and r["eval_set"] == eval_set]
        for method in _methods(mrows):
            pts = [(xs.index(r["bits"]), 100 * r["value"]) for r in mrows if r["method"] == method]
            if pts:
                ax.plot(*zip(*sorted(pts)), marker="o", label=method)
        fl = [r for r in mrows if r["method"] == "float"]
        if fl:
            ax.axhline(100 * fl[0]["value"], color="k", ls="--", lw=1, label="float")
        ax.set_xticks(range(len(xs)), xs)
        ax.set_title(f"{model}, {_SET_TITLES[eval_set]}")
        ax.set_ylabel(f"{mrows[0]['metric']} %")
        if mrows[0]["metric"] == "wer":
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
