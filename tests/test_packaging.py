"""The core installs alone: quantizer, observers and ESC's search import and run without the
extras (speech models, ExecuTorch, the benchmark's tools)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRAS_ONLY = ("torchaudio", "whisper", "executorch", "jiwer", "matplotlib")

SCRIPT = f"""
import sys

class Missing:  # as if the extras were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {EXTRAS_ONLY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}")

sys.meta_path.insert(0, Missing())
import torch
from esc_ao import EscQuantizer, QuantConfig, SearchConfig, calibrate, convert, export_model, observe, prepare
from esc_ao.lower.cuda import lower_int8_linears

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
batches = [(torch.randn(24, 16),) for _ in range(3)]
prepared = prepare(export_model(model, batches[0]), EscQuantizer(QuantConfig(method="esc")))
observe(prepared, batches)
result = calibrate(prepared, batches, config=SearchConfig(budget=1, popsize=4, progress=False))
assert result.final_objective <= result.initial_objective
print("linears lowered:", lower_int8_linears(convert(prepared)).replaced)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in {EXTRAS_ONLY!r})
assert not leaked, leaked
"""


def test_the_core_runs_without_the_extras() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "linears lowered: 2" in done.stdout


def test_the_core_dependencies_are_the_core() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {d.split("==")[0] for d in project["dependencies"]}
    assert core == {"torch", "torchao", "cma", "numpy", "tqdm"}
    extras = project["optional-dependencies"]
    assert {"speech", "deploy", "bench", "all", "dev"} <= set(extras)
    assert "executorch==1.5.1" in extras["deploy"] and "esc-ao[all]" in extras["dev"]
