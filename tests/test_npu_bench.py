"""The NPU benchmark: one model x calibration through Arm's quantizer, Vela and the TOSA
reference model, scored three ways; its table; bad requests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_ethosu import Block

from esc_ao.bench.npu import NpuModel, render, run_case, search_config
from esc_ao.cli import main
from esc_ao.metrics import accuracy
from esc_ao.search.objectives import OutputMSE


def _block_model() -> NpuModel:
    """The small transformer block as a 'classifier': class = argmax of the output's first
    frame (its float predictions are the labels, so float scores 100 %)."""
    torch.manual_seed(0)
    model = Block().eval()
    calib = [(torch.randn(1, 16, 32),) for _ in range(6)]
    test = [torch.randn(1, 16, 32) for _ in range(5)]
    with torch.no_grad():
        truth = [int(model(x)[0, 0].argmax()) for x in test]

    def score(outputs: list[torch.Tensor]) -> object:
        return accuracy([int(o[0, 0].argmax()) == y for o, y in zip(outputs, truth)])

    return NpuModel("block", "accuracy", model, calib, lambda idx: OutputMSE(), test, score, {"test_clips": 5})  # type: ignore[arg-type]


def test_each_calibration_has_its_search_and_bad_names_are_refused() -> None:
    assert search_config("arm", 0) is None
    mse, esc = search_config("mse", 0), search_config("esc", 0)
    assert mse is not None and mse.budget == 0 and mse.stages == 1
    assert esc is not None and esc.stages > 1 and esc.stage_budget > 0
    with pytest.raises(ValueError, match="method 'max': use one of arm, mse, esc"):
        search_config("max", 0)


@pytest.mark.slow  # Arm's quantizer, Vela and the TOSA reference model
def test_a_case_scores_float_graph_and_tosa_program(tmp_path: Path) -> None:
    row = run_case(_block_model(), "mse", "ethos-u85-256", tmp_path, seed=0, tosa_limit=3)
    s = row["scores"]
    assert s["float"]["value"] == 1.0 and s["float"]["n"] == 5
    assert s["graph"]["n"] == 5 and s["tosa"]["n"] == 3 == s["tosa_inputs"]
    assert s["float_on_tosa_inputs"]["n"] == 3 and s["graph_on_tosa_inputs"]["n"] == 3
    assert row["search"]["scales"] > 10 and row["search"]["objective_final"] <= row["search"]["objective_start"]
    low = row["lowered"]
    assert len(low["delegates"]) == 1 and low["check"]["max_lsb"] <= 2
    assert [r["target"] for r in row["sweep"]] == ["ethos-u55-128"] and row["sweep"][0]["inference_ms"] > 0
    md = render([row], {"command": "c", "machine": "m", "torch": "t", "executorch": "e", "n_calibration": 6, "seed": 0})
    assert "| block | mse |" in md and "on the first 3" in md and "ethos-u55-128" in md
    json.dumps(row)  # the row is what npu.json stores


def test_bad_npu_bench_requests_are_usage_errors(capsys) -> None:
    assert main(["bench", "npu", "--target", "ethos-u99-1"]) == 2
    assert "ethos-u85-256" in capsys.readouterr().err
    assert main(["bench", "npu", "--tosa-limit", "0"]) == 2
    assert "--tosa-limit 0: give a positive count" in capsys.readouterr().err


def test_render_only_rewrites_the_table_from_its_json(tmp_path: Path, capsys) -> None:
    assert main(["bench", "npu", "--render-only", "--out", str(tmp_path)]) == 2
    assert "no results to render" in capsys.readouterr().err
    meta = {"command": "c", "machine": "m", "torch": "t", "executorch": "e", "n_calibration": 1, "seed": 0}
    (tmp_path / "npu.json").write_text(json.dumps({"meta": meta, "rows": []}))
    assert main(["bench", "npu", "--render-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "npu.md").read_text().startswith("# Speech models on an Arm Ethos-U NPU")
