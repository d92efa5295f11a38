"""Driving the native C++ runner (runner/esc_ao_runner.cpp, built by CMake against the
ExecuTorch wheel) from Python: inputs to a file, outputs and latency back, and the
process's peak resident memory (what a deployment of the .pte would hold)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["NativeRun", "RunnerMissingError", "runner_path", "run_native"]

_REPO = Path(__file__).resolve().parents[3]
DEFAULT_RUNNER = _REPO / "build" / "runner" / "esc_ao_runner"


class RunnerMissingError(FileNotFoundError):
    """The native runner has not been built."""


@dataclass(frozen=True)
class NativeRun:
    output: torch.Tensor  # every tensor output, flattened and concatenated (float32)
    median_ms: float
    min_ms: float
    max_ms: float
    runs: int
    peak_rss_bytes: int
    threads: int  # the size of ExecuTorch's thread pool the program ran on


def runner_path() -> Path:
    path = Path(os.environ.get("ESC_AO_RUNNER", DEFAULT_RUNNER))
    if not path.is_file():
        raise RunnerMissingError(
            f"native runner {path} not found: build it with `bash scripts/build_runner.sh` "
            "(or point ESC_AO_RUNNER at a built esc_ao_runner)"
        )
    return path


def run_native(
    pte: str | Path, inputs: Sequence[torch.Tensor], runs: int = 10, warmup: int = 2, threads: int | None = None
) -> NativeRun:
    """Runs ``forward`` of a .pte in the native runner, in a child process of its own, on
    ``threads`` threads (None: ExecuTorch's default, one per core)."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads}: give at least 1 (or None for one per core)")
    exe = runner_path()
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        src.write_bytes(b"".join(t.detach().contiguous().numpy().tobytes() for t in inputs))
        proc = subprocess.run(
            [str(exe), str(pte), str(src), str(dst), "--runs", str(runs), "--warmup", str(warmup)]
            + ([] if threads is None else ["--threads", str(threads)]),
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"esc_ao_runner failed on {pte} (exit {proc.returncode}): {proc.stderr.strip()}")
        timing = json.loads(proc.stdout.strip().splitlines()[-1])
        output = torch.frombuffer(bytearray(dst.read_bytes()), dtype=torch.float32)
    return NativeRun(
        output,
        timing["median_ms"],
        timing["min_ms"],
        timing["max_ms"],
        timing["runs"],
        int(timing["peak_rss_kb"]) * 1024,
        int(timing["threads"]),
    )
