"""The speed table keeps the rows of models not measured in this run, each with the machine
and settings it was measured with (int8 speed depends on the CPU)."""

from __future__ import annotations

import json
from pathlib import Path

from esc_ao.bench import speed


def _row(model: str, variant: str, ms: float) -> dict:
    return {
        "model": model,
        "variant": variant,
        "median_ms": ms,
        "round_medians_ms": [ms, ms + 1],
        "speedup_vs_float": 1.0,
        "peak_rss_bytes": 10**7,
        "size_bytes": 10**6,
        "sqnr_vs_float_db": 30.0,
        "coverage_summary": "1 XNNPACK delegate call(s)",
    }


def test_measuring_one_model_keeps_the_others(tmp_path: Path, monkeypatch) -> None:
    legacy = {
        "meta": {"machine": "old CPU, 2 cores", "runs_per_round": 20, "rounds": 3},
        "rows": [_row("conformer", "float", 86.3), _row("whisper-encoder", "float", 290.0)],
    }
    (tmp_path / "speed.json").write_text(json.dumps(legacy))
    monkeypatch.setattr(speed, "describe_cpu", lambda: "new CPU (avx512_vnni), 2 cores")
    speed._write([_row("whisper-encoder", "float", 250.0), _row("whisper-encoder", "int8", 100.0)], 5, 2, tmp_path)
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert [(r["model"], r["variant"], r["median_ms"]) for r in rows] == [
        ("conformer", "float", 86.3),
        ("whisper-encoder", "float", 250.0),
        ("whisper-encoder", "int8", 100.0),
    ]
    assert rows[0]["machine"] == "old CPU, 2 cores" and rows[0]["runs_per_round"] == 20
    assert rows[1]["machine"] == "new CPU (avx512_vnni), 2 cores" and rows[1]["rounds"] == 2
    md = (tmp_path / "speed.md").read_text()
    assert "machine: old CPU, 2 cores" in md and "--models whisper-encoder --runs 5 --rounds 2" in md


def test_threads_slower_programs_and_profiles_are_in_the_table(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(speed, "describe_cpu", lambda: "CPU (avx512_vnni), 2 cores")
    profile = {
        "total_ms": 10.0,
        "kinds_ms": {
            "Fully Connected (NC, QS8, QC8W) GEMM": 6.0,
            "Softmax (NC, F32)": 2.5,
            "Convert (NC, F32, QS8)": 1.0,
        },
        "calls": {},
    }
    fast = {**_row("ast", "int8", 5.0), "threads": 1, "speedup_vs_float": 2.0, "profile": profile}
    slow = {**_row("ast", "w4a4", 12.0), "threads": 2, "speedup_vs_float": 0.83}
    speed._write([fast, slow], 5, 2, tmp_path)
    md = (tmp_path / "speed.md").read_text()
    assert "--threads 1 2`; machine: CPU (avx512_vnni), 2 cores" in md
    assert "| int8 | 1 | 5.0 |" in md and "| 2.0x |" in md
    assert "| w4a4 | 2 | 12.0 |" in md and "0.83x **slower**" in md
    shares = "| int8 | 10.0 | 60 | 0 | 10 | 25 | 5 |"
    assert f"{shares} Fully Connected (NC, QS8, QC8W) GEMM 6.0; Softmax (NC, F32) 2.5; Convert" in md
