"""examples/w4a4_diagnosis.py on the small stand-in task of the accuracy-bench tests: every
variant quantizes, calibrates and evaluates, and affine grids really differ from symmetric."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from _bench_helpers import stand_in_task

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "w4a4_diagnosis.py"


@pytest.fixture(scope="module")
def diagnosis():
    spec = importlib.util.spec_from_file_location("w4a4_diagnosis", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variants_run_and_report(diagnosis, tmp_path: Path) -> None:
    task = stand_in_task(40, 0)
    exported = {}
    rows = {}
    for symmetric in (True, False):
        for method, budget in (("max", 0), ("esc", 2)):
            row = diagnosis.run_variant(task, exported, method, symmetric, budget, seed=0)
            assert 0.0 <= row["ci95_low"] <= row["value"] <= row["ci95_high"] <= 1.0 and row["n"] == 64
            rows[(method, symmetric)] = row
    (esc,) = rows[("esc", True)]["search"]
    assert esc["evaluations"] > 0 and esc["objective_final"] <= esc["objective_start"]
    assert esc["holdout_start"] is not None  # 5 batches: the fifth is held out
    assert rows[("max", True)]["search"] is None
    # the ReLU output is non-negative: an affine grid spends its 16 levels on it, not 8
    assert rows[("esc", False)]["search"][0]["objective_start"] != esc["objective_start"]
    diagnosis.write_results(
        tmp_path / "diag",
        "stand-in",
        "accuracy",
        1,
        [{"variant": "esc", **rows[("esc", True)]}, {"variant": "max", **rows[("max", True)]}],
    )
    md = (tmp_path / "diag.md").read_text()
    assert f"{esc['holdout_start']:.4f} -> {esc['holdout_final']:.4f}" in md and "| max | " in md
