"""The main job's report: typed in memory, the same data on disk, re-renderable."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from esc_ao.config import QuantConfig
from esc_ao.job import JobInputs, JobReport, quantize_job
from esc_ao.render import render_markdown


def _inputs() -> JobInputs:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).eval()
    batches = [(torch.randn(3, 16),) for _ in range(5)]
    return JobInputs(name="mlp", model=model, calibration=batches[:4], heldout=batches[4:])


def test_job_report_is_typed_and_matches_what_it_wrote(tmp_path: Path) -> None:
    report = quantize_job(_inputs(), QuantConfig(method="mse"), tmp_path / "out")
    assert isinstance(report, JobReport)
    assert report.calibration_batches == 4 and report.heldout_batches == 1 and report.esc is None
    # both linears are quantized and measured; the GELU between them stays float
    linears = [row for row in report.layers if row.op == "aten.linear.default"]
    assert len(linears) == 2 and all(row.quantized and row.sqnr_db is not None for row in linears)
    assert [row.quantized for row in report.layers if row.op == "aten.gelu.default"] == [False]
    assert report.output_sqnr_db > 20.0 and report.total_seconds is not None
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    # total_seconds is known only after the files are written
    assert on_disk == {k: v for k, v in report.to_dict().items() if k != "total_seconds"}
    assert on_disk["size"]["program_file_bytes"] > 0
    # a saved report renders to the Markdown the job wrote
    assert render_markdown(on_disk) == (tmp_path / "out" / "report.md").read_text()


def test_job_without_an_output_directory_writes_nothing(tmp_path: Path) -> None:
    report = quantize_job(_inputs(), QuantConfig(method="max", weight_bits=4, act_bits=8), None)
    assert report.config.label == "w4a8" and "program_file_bytes" not in report.size
    assert report.to_dict()["config"]["label"] == "w4a8" and "executorch" not in report.to_dict()
