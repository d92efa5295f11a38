"""ESC against the MSE baseline on Whisper tiny.en's encoder, and the search's speed.

    esc-ao bench esc [--bits w4a4 w8a8] [--budget 20] [--popsize 8] [--calib-clips 12]

For each bit width: the MSE baseline's held-out output SQNR, then ESC (local step + CMA-ES
with the given budget) on the same observers: objective before/after, held-out SQNR,
evaluations per second, wall time. Writes ``whisper_encoder_esc.json`` / ``.md`` and one
convergence plot per bit width into the output directory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from esc_ao.atomic import write_json_atomic, write_text_atomic
from esc_ao.bench.machine import describe
from esc_ao.config import QuantConfig, SearchConfig
from esc_ao.job import quantize_job, whisper_default
from esc_ao.render import plot_convergence

__all__ = ["run_esc_bench"]


def run_esc_bench(
    out_dir: Path, bits: list[str], search: SearchConfig, n_calibration: int | None
) -> list[dict[str, Any]]:
    inputs = whisper_default(n_calibration)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for label in bits:
        base = quantize_job(inputs, QuantConfig.from_label(label, method="mse"), None)
        t0 = time.perf_counter()
        esc_report = quantize_job(inputs, QuantConfig.from_label(label, method="esc"), None, search=search)
        esc = esc_report.esc
        if esc is None:
            raise RuntimeError(f"{label}: the ESC job returned no search result")
        row = {
            "model": inputs.name,
            "bits": label,
            "metric": "output_sqnr_db",
            "mse_value": round(base.output_sqnr_db, 2),
            "esc_value": round(esc_report.output_sqnr_db, 2),
            "objective_local_step": esc.initial_objective,
            "objective_final": esc.final_objective,
            "start": f"start: {esc.start}",
            "evaluations": esc.evaluations,
            "evaluations_per_second": round(esc.evaluations_per_second, 3),
            "search_seconds": round(esc.wall_seconds, 1),
            "total_seconds": round(time.perf_counter() - t0, 1),
            "scales": len(esc.labels),
            "calibration_batches": esc_report.calibration_batches,
            "heldout_batches": esc_report.heldout_batches,
            "budget": search.budget,
            "popsize": search.popsize,
            "seed": search.seed,
        }
        rows.append(row)
        print(row, flush=True)
        if esc.history:
            plot_convergence(esc.history, esc.initial_objective, out_dir / f"whisper_encoder_esc_{label}.png")
    meta = {"machine": describe(), "torch": torch.__version__}
    write_json_atomic(out_dir / "whisper_encoder_esc.json", {"meta": meta, "rows": rows})
    lines = [
        "# ESC vs MSE on Whisper tiny.en's encoder (output SQNR, dB, held-out clips)",
        "",
        f"Command: `esc-ao bench esc --bits {' '.join(bits)} --budget {search.budget} --popsize {search.popsize} "
        f"--calib-clips {n_calibration or 12}`; {meta['machine']}, torch {meta['torch']}.",
        "",
        "| bits | MSE | ESC | objective local -> final | evaluations | evals/s | search s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['bits']} | {r['mse_value']:.2f} | {r['esc_value']:.2f} | "
            f"{r['objective_local_step']:.4g} -> {r['objective_final']:.4g} | {r['evaluations']} | "
            f"{r['evaluations_per_second']:.3f} | {r['search_seconds']:.0f} |"
        )
    write_text_atomic(out_dir / "whisper_encoder_esc.md", "\n".join(lines) + "\n")
    return rows


def run_calib_bench(bits: str, search: SearchConfig, n_calibration: int | None) -> dict[str, Any]:
    """One ESC calibration of Whisper tiny.en's encoder; returns (and, on rank 0, prints)
    its wall time and evaluations per second. Under torchrun the evaluation is sharded."""
    import json
    import os

    from esc_ao.pipeline import export_model, observe, prepare
    from esc_ao.quantizer import EscQuantizer
    from esc_ao.search.calibrate import calibrate

    inputs = whisper_default(n_calibration)
    t0 = time.perf_counter()
    prepared = prepare(
        export_model(inputs.model, inputs.calibration[0]), EscQuantizer(QuantConfig.from_label(bits, method="esc"))
    )
    observe(prepared, inputs.calibration)
    t_observe = time.perf_counter() - t0
    result = calibrate(prepared, inputs.calibration, config=search)
    row = {
        "bits": bits,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "threads": torch.get_num_threads(),
        "calibration_batches": len(inputs.calibration),
        "scales": len(result.labels),
        "evaluations": result.evaluations,
        "search_seconds": round(result.wall_seconds, 1),
        "evaluations_per_second": round(result.evaluations_per_second, 3),
        "observe_seconds": round(t_observe, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "objective_start": result.initial_objective,
        "objective_final": result.final_objective,
    }
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(row), flush=True)
    return row
