"""The accuracy benchmark's outputs, rendered from the cells present (computes nothing):
``accuracy.json`` (one record per cell), ``accuracy.md`` (the table with the command,
machine and wall times) and ``accuracy.png`` (metric against bits, one line per method, one
panel per model). Kept apart from the cell computation so that changing the layout does not
change the code version that keys the cells."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from esc_ao.bench import cells as cellkeys
from esc_ao.bench.cells import BITS, MODELS, AccuracySettings
from esc_ao.config import METHODS
from esc_ao.report import write_json_atomic, write_text_atomic

__all__ = ["render", "stale_cells"]

log = logging.getLogger(__name__)


def render(out: Path, cells: Path, settings: AccuracySettings) -> list[dict[str, Any]]:
    """Writes the JSON, Markdown and plot from the cells present (computes nothing)."""
    versions = _versions()  # hashes every model's weights and manifest: once per render
    rows = _collect(cells, settings, versions)
    _write_outputs(rows, out, settings, versions)
    return rows


def _versions() -> dict[str, dict[str, str]]:
    """Each model's current code versions ({"baselines": float and baseline cells', "esc":
    ESC cells'}); models whose corpus is not built are left out (their cells cannot be
    matched: a warning says so)."""
    versions = {}
    for model in MODELS:
        try:
            versions[model] = {"baselines": cellkeys.code_version(model, "max"),
                               "esc": cellkeys.code_version(model, "esc")}
        except FileNotFoundError as exc:
            log.warning("%s: its cells are left out of the table", exc)
    return versions


def _version(versions: dict[str, str], method: str) -> str:
    return versions["esc" if method == "esc" else "baselines"]


def stale_cells(cells: Path) -> list[Path]:
    """Cell files of a code version that is no longer current (any settings). A model whose
    corpus is not built has no current version: its cells are kept, never judged stale."""
    versions = _versions()
    return sorted(path for model, current in versions.items() for path in (cells / model).glob("*.json")
                  if not path.stem.endswith(tuple(f"-{v}" for v in current.values())))


def _collect(cells: Path, settings: AccuracySettings, versions: dict[str, dict[str, str]]) -> list[dict[str, Any]]:
    """Every cell present for these settings and each model's current code versions, in
    table order (float first, then bits x methods)."""
    rows = []
    for model, current in versions.items():
        for method, bits in [("float", "fp32")] + [(m, b) for b in BITS for m in METHODS]:
            path = cellkeys.cell_path(cells, model, method, bits, settings, _version(current, method))
            if path.exists():
                rows.append(json.loads(path.read_text()))
    return rows


def _fmt(r: dict[str, Any]) -> str:
    scale = 100.0
    return f"{scale * r['value']:.2f} [{scale * r['ci95_low']:.2f}, {scale * r['ci95_high']:.2f}]"


def _write_outputs(rows: list[dict[str, Any]], out: Path, settings: AccuracySettings,
                   versions: dict[str, dict[str, str]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "accuracy.json", {"settings": asdict(settings), "code_versions": versions, "rows": rows})
    machines = sorted({r.get("machine", "?") for r in rows})
    lines = ["# Accuracy benchmark: calibration methods x bit widths", "",
             f"Command: `bash scripts/bench_accuracy.sh --calib-samples {settings.n_calibration} --seed {settings.seed} "
             f"--budget {settings.budget} --popsize {settings.popsize}` (cells cached per model, method, bits, seed, "
             f"code version). Machine: {'; '.join(machines)}.", "",
             "Code versions (baselines / ESC): "
             f"{', '.join(m + ' ' + v['baselines'] + ' / ' + v['esc'] for m, v in versions.items())}; "
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
