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
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from esc_ao import EscQuantizer, QuantConfig, SearchConfig, calibrate, convert, export_model, observe, prepare
from esc_ao.bench.tasks import Task, build_task
from esc_ao.eval_graph import for_evaluation
from esc_ao.report import write_json_atomic, write_text_atomic

# (name, method, symmetric activation grids, CMA-ES generations)
VARIANTS = (
    ("max, symmetric", "max", True, 0),
    ("max, affine", "max", False, 0),
    ("mse, symmetric", "mse", True, 0),
    ("mse, affine", "mse", False, 0),
    ("esc, affine", "esc", False, 30),  # symmetric with budget 30: the table's W4A4 ESC cell
    ("esc, symmetric, budget x4", "esc", True, 120),
)


def run_variant(task: Task, graph: torch.fx.GraphModule, method: str, symmetric: bool, budget: int,
                seed: int) -> dict[str, Any]:
    part = task.parts[0]  # single-graph tasks (conformer-ctc, ast)
    t0 = time.perf_counter()
    batches = part.calibration({})
    config = QuantConfig(weight_bits=4, act_bits=4, method=method, act_symmetric=symmetric)
    prepared = prepare(copy.deepcopy(graph), EscQuantizer(config, target="reference"))
    observe(prepared, batches)
    search = None
    if method == "esc":
        result = calibrate(prepared, batches[: part.search_batches], part.objective({}),
                           SearchConfig(budget=budget, popsize=8, seed=seed, progress=False))
        search = {"objective_start": result.initial_objective, "objective_final": result.final_objective,
                  "evaluations": result.evaluations}
    converted = for_evaluation(convert(prepared))
    with torch.no_grad():
        est = task.evaluate({part.name: converted})
    return {"value": est.value, "ci95_low": est.low, "ci95_high": est.high, "n": est.n, "search": search,
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("ast", "conformer-ctc"), default="ast")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = build_task(args.model, 100, args.seed)
    part = task.parts[0]
    graph = export_model(part.model, part.calibration({})[0], part.dynamic_shapes)
    rows = []
    for name, method, symmetric, budget in VARIANTS:
        row = {"variant": name, "method": method, "act_symmetric": symmetric, "budget": budget,
               **run_variant(task, graph, method, symmetric, budget, args.seed)}
        print(json.dumps(row), flush=True)
        rows.append(row)
        write_results(args.out / f"w4a4_diagnosis_{args.model}", args.model, task.metric, args.threads, rows)


def write_results(stem: Path, model: str, metric: str, threads: int, rows: list[dict[str, Any]]) -> None:
    """JSON and Markdown of the variants so far (rewritten after each: a stopped run keeps them)."""
    write_json_atomic(stem.with_suffix(".json"), {"model": model, "metric": metric, "rows": rows})
    lines = [f"# W4A4 variants: {model} ({metric}, %)", "",
             f"Command: `python examples/w4a4_diagnosis.py --model {model} --threads {threads}`. "
             "Weights 4-bit per channel, activations 4-bit per tensor, full integer (as the table).", "",
             f"| variant | {metric} % [95 % CI] | ESC objective start -> final | seconds |", "|---|---|---|---|"]
    for r in rows:
        search = r["search"]
        objective = f"{search['objective_start']:.4f} -> {search['objective_final']:.4f}" if search else "-"
        lines.append(f"| {r['variant']} | {100 * r['value']:.2f} [{100 * r['ci95_low']:.2f}, "
                     f"{100 * r['ci95_high']:.2f}] | {objective} | {r['seconds']:.0f} |")
    write_text_atomic(stem.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
