"""The main job through the command line, and the program it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from esc_ao.cli import main

pytestmark = pytest.mark.slow


def test_quantize_default_writes_program_and_report(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["quantize", "--method", "mse", "--calib-clips", "2", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "whisper-tiny.en-encoder" and report["calibration_batches"] == 2
    assert report["heldout_batches"] == 4
    quantized = [row for row in report["layers"] if row["quantized"]]
    assert all(row["sqnr_db"] is not None for row in quantized)
    # every linear and conv, and the block LayerNorms' outputs; the residual adds and the
    # final LayerNorm (a graph output) stay float under the default recipe
    kinds = [row["op"].split(".")[1] for row in quantized]
    assert (kinds.count("linear"), kinds.count("conv1d"), kinds.count("layer_norm")) == (24, 2, 8), kinds
    assert report["size"]["quantized_bytes"] < 0.3 * report["size"]["float32_bytes"]
    # The saved program holds int8 weights, not the float ones as well.
    assert report["size"]["program_file_bytes"] < 0.45 * report["size"]["float32_bytes"]
    # The default recipe: smoothing at every LayerNorm that feeds only linears, a float
    # residual stream whose writers run as dynamic int8 GEMMs.
    assert report["recipe"]["suffix"] == "+xnn+rf+sq"
    smoothed = [t for t in report["transforms"] if t["applied"]]
    assert len(smoothed) == 8 and all(t["transform"] == "smooth" for t in smoothed)
    assert sum("writes the float residual stream" in row["reason"] for row in report["layers"]) == 8
    md = (out / "report.md").read_text()
    assert "output SQNR" in md and "| conv1d |" in md and "## Transforms" in md
    program = torch.export.load(str(out / "model.pt2")).module()
    y = program(torch.zeros(1, 80, 3000))
    assert y.shape == (1, 1500, 384) and torch.isfinite(y).all()
    assert "output SQNR" in capsys.readouterr().out
    # The .pte: one XNNPACK delegate, every linear and conv an int8 kernel, checked
    # against the converted graph (to_executorch raises below its floor).
    pte = report["executorch"]
    assert (out / "model.pte").stat().st_size == pte["size_bytes"] < 0.4 * report["size"]["float32_bytes"]
    cov = pte["coverage"]
    assert cov["delegate_calls"] == 1 and cov["portable_kernels"] == {}, cov
    assert cov["integer_kernels"]["linear"] == 4 * 6 and cov["integer_kernels"]["convolution"] == 2, cov
    assert pte["program_vs_float_db"] >= pte["graph_vs_float_db"] - 3.0 and "ExecuTorch program model.pte" in md


def test_quantize_program_file(tmp_path: Path) -> None:
    torch.manual_seed(0)  # the SQNR floor below was measured on this seed
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).eval()
    x = torch.randn(3, 16)
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "mlp.pt2"))
    torch.save([(torch.randn(3, 16),) for _ in range(9)], tmp_path / "calib.pt")
    out = tmp_path / "out"
    assert (
        main(
            [
                "quantize",
                "--program",
                str(tmp_path / "mlp.pt2"),
                "--calib-data",
                str(tmp_path / "calib.pt"),
                "--method",
                "max",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "mlp" and report["output_sqnr_db"] > 25.0


def test_quantize_with_esc_writes_search_report_and_plot(tmp_path: Path) -> None:
    out, ckpt = tmp_path / "out", tmp_path / "search.ckpt"
    args = [
        "quantize",
        "--method",
        "esc",
        "--weight-bits",
        "4",
        "--act-bits",
        "4",
        "--budget",
        "1",
        "--popsize",
        "4",
        "--calib-clips",
        "1",
        "--out",
        str(out),
        "--checkpoint",
        str(ckpt),
        "--no-pte",
        "--target",
        "reference",
    ]
    assert main([*args, "--stages", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    esc = report["esc"]
    assert esc["final_objective"] <= esc["initial_objective"]
    # one dimension per activation observer of the encoder (a shared observer is one)
    assert len(esc["labels"]) >= 40 and len(set(esc["labels"])) == len(esc["labels"])
    assert esc["evaluations"] == 2 + 4 + 1 and esc["stages"] == []
    assert (out / "convergence.png").stat().st_size > 1000 and ckpt.exists()
    assert "ESC:" in (out / "report.md").read_text()
    # At 4-bit weights the default recipe rounds with GPTQ and keeps the conv front end at
    # 8-bit weights.
    assert {"gptq", "c8"} <= set(report["recipe"]["suffix"].split("+")), report["recipe"]
    # The default search is staged: each stage searched on its own, never ending worse
    # than it started, then one flat generation from there.
    ckpt.unlink()
    assert main([*args, "--stage-budget", "1"]) == 0
    esc = json.loads((out / "report.json").read_text())["esc"]
    assert len(esc["stages"]) >= 4 and esc["final_objective"] <= esc["initial_objective"]
    assert all(s["objective_final"] <= s["objective_start"] for s in esc["stages"]), esc["stages"]
    assert "## ESC staged search" in (out / "report.md").read_text()


def test_calibration_data_that_fits_the_default_model_is_used(tmp_path: Path) -> None:
    from esc_ao.speech import bundled_clips, whisper_mel

    mels = [(whisper_mel(c.audio),) for c in bundled_clips("heldout")[:2]]
    torch.save(mels, tmp_path / "mels.pt")
    out = tmp_path / "out"
    assert (
        main(["quantize", "--calib-data", str(tmp_path / "mels.pt"), "--method", "mse", "--no-pte", "--out", str(out)])
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["calibration_batches"] == 2
    assert report["notes"]["calibration_voices"] == [f"--calib-data {tmp_path / 'mels.pt'}"]
