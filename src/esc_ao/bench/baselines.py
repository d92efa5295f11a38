"""Output SQNR of Whisper tiny.en's encoder for every calibration method and bit width.

    esc-ao bench baselines [--calib-clips 12] [--out docs/results]

Writes ``whisper_encoder_sqnr.json`` (one record per cell) and ``whisper_encoder_sqnr.md``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from esc_ao.atomic import write_json_atomic, write_text_atomic
from esc_ao.bench.machine import describe
from esc_ao.config import QuantConfig
from esc_ao.job import quantize_job, whisper_default

__all__ = ["run_baselines"]

BASELINES = ("max", "percentile", "entropy", "mse")
BITS = ((8, 8), (4, 8), (4, 4))


def run_baselines(
    out_dir: Path, n_calibration: int | None = None, methods: tuple[str, ...] = BASELINES
) -> list[dict[str, Any]]:
    inputs = whisper_default(n_calibration)
    rows = []
    for wb, ab in BITS:
        for method in methods:
            t0 = time.perf_counter()
            report = quantize_job(inputs, QuantConfig(weight_bits=wb, act_bits=ab, method=method), None)
            rows.append(
                {
                    "model": inputs.name,
                    "method": method,
                    "bits": f"w{wb}a{ab}",
                    "metric": "output_sqnr_db",
                    "value": round(report.output_sqnr_db, 2),
                    "calibration_batches": report.calibration_batches,
                    "heldout_batches": report.heldout_batches,
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
            print(rows[-1], flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"machine": describe(), "torch": torch.__version__}
    write_json_atomic(out_dir / "whisper_encoder_sqnr.json", {"meta": meta, "rows": rows})
    lines = [
        "# Whisper tiny.en encoder: output SQNR (dB) vs float, held-out clips",
        "",
        f"Command: `esc-ao bench baselines --calib-clips {n_calibration or 12}`; {meta['machine']}, "
        f"torch {meta['torch']}. Everything quantized (full integer: linear, conv, attention matmuls, "
        "residual adds, LayerNorm in/out).",
        "",
        "| method | " + " | ".join(f"w{w}a{a}" for w, a in BITS) + " |",
        "|---|" + "---|" * len(BITS),
    ]
    for method in methods:
        cells = [next(r["value"] for r in rows if r["method"] == method and r["bits"] == f"w{w}a{a}") for w, a in BITS]
        lines.append(f"| {method} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    write_text_atomic(out_dir / "whisper_encoder_sqnr.md", "\n".join(lines) + "\n")
    return rows
