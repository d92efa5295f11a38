"""Why does W4A4 collapse? Variants of the benchmark's W4A4 cell on one model, outside the
table: activation grids symmetric (the paper's and the table's choice) vs affine (a zero
point, so a non-negative tensor such as softmax probabilities or a GELU output uses all 16
levels instead of 8), and ESC with a 4x larger CMA-ES budget.

    python examples/w4a4_diagnosis.py --model ast --threads 1

Writes docs/results/w4a4_diagnosis_<model>.{json,md}. Same task, calibration sample and
test split as `esc-ao bench accuracy` (esc_ao.bench.tasks).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from esc_ao import QuantConfig, SearchConfig
from esc_ao.atomic import write_json_atomic, write_text_atomic
from esc_ao.bench.accuracy import quantize_task
from esc_ao.bench.tasks import Task, build_task

# (name, method, symmetric activation grids, CMA-ES generations)
VARIANTS = (
    ("max, symmetric", "max", True, 0),
    ("max, affine", "max", False, 0),
    ("mse, symmetric", "mse", True, 0),
    ("mse, affine", "mse", False, 0),
    ("esc, affine", "esc", False, 30),  # symmetric with budget 30: the table's W4A4 ESC cell
    ("esc, symmetric, budget x4", "esc", True, 120),
)


def run_variant(
    task: Task, exported: dict[str, GraphModule], method: str, symmetric: bool, budget: int, seed: int
) -> dict[str, Any]:
    """One W4A4 variant, quantized as the benchmark's cells are (esc_ao.bench.accuracy)."""
    t0 = time.perf_counter()
    config = QuantConfig(weight_bits=4, act_bits=4, method=method, act_symmetric=symmetric)
    q = quantize_task(task, config, SearchConfig(budget=budget, popsize=8, seed=seed, progress=False), exported)
    with torch.no_grad():
        est = task.evaluate(q.forwards)
    search = [
        {
            k: e[k]
            for k in ("part", "objective_start", "objective_final", "holdout_start", "holdout_final", "evaluations")
        }
        for e in q.esc
    ] or None
    return {
        "value": est.value,
        "ci95_low": est.low,
        "ci95_high": est.high,
        "n": est.n,
        "search": search,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("ast", "conformer-ctc", "whisper-tiny.en"), default="ast")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = build_task(args.model, 100, args.seed)
    exported: dict[str, GraphModule] = {}
    rows = []
    for name, method, symmetric, budget in VARIANTS:
        row = {
            "variant": name,
            "method": method,
            "act_symmetric": symmetric,
            "budget": budget,
            **run_variant(task, exported, method, symmetric, budget, args.seed),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        write_results(args.out / f"w4a4_diagnosis_{args.model}", args.model, task.metric, args.threads, rows)


def write_results(stem: Path, model: str, metric: str, threads: int, rows: list[dict[str, Any]]) -> None:
    """JSON and Markdown of the variants so far (rewritten after each: a stopped run keeps them)."""
    write_json_atomic(stem.with_suffix(".json"), {"model": model, "metric": metric, "rows": rows})
    lines = [
        f"# W4A4 variants: {model} ({metric}, %)",
        "",
        f"Command: `python examples/w4a4_diagnosis.py --model {model} --threads {threads}`. "
        "Weights 4-bit per channel, activations 4-bit per tensor, full integer (as the table).",
        "",
        f"| variant | {metric} % [95 % CI] | ESC objective start -> final (held out) | seconds |",
        "|---|---|---|---|",
    ]
    for r in rows:
        objective = "; ".join(_objective(s) for s in r["search"] or []) or "-"
        lines.append(
            f"| {r['variant']} | {100 * r['value']:.2f} [{100 * r['ci95_low']:.2f}, "
            f"{100 * r['ci95_high']:.2f}] | {objective} | {r['seconds']:.0f} |"
        )
    write_text_atomic(stem.with_suffix(".md"), "\n".join(lines) + "\n")


def _objective(search: dict[str, Any]) -> str:
    text = f"{search['objective_start']:.4f} -> {search['objective_final']:.4f}"
    if search.get("holdout_start") is not None:
        text += f" ({search['holdout_start']:.4f} -> {search['holdout_final']:.4f})"
    return text


if __name__ == "__main__":
    main()
