"""Where a .pte's time goes: XNNPACK's per-operator timings, read from an ETDump.

The ExecuTorch wheel's XNNPACK delegate is built with XNNPACK's operator profiling, and its
Python runtime can attach an ETDump event tracer, so each XNNPACK operator of a program
(``Fully Connected (NC, QS8, QC8W) GEMM #3``, ``Convert (NC, F32, QS8) #12``, ...) reports
its own time per call. Operators are grouped by kind (the name without its ``#N``) and by
category (integer GEMM-like, float GEMM-like, quantize/dequantize conversions, the rest),
which is what deciding where an integer program loses time against float needs. Time spent
outside the delegate (portable kernels, the method's own overhead) is ``outside``.

Runs in this process through ``executorch.extension.pybindings`` (the C++ runner has no
event tracer linked), with the thread pool set to ``threads``.
"""

from __future__ import annotations

import re
import statistics
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["CATEGORIES", "OpProfile", "categorize", "category", "op_kind", "profile_pte"]

CATEGORIES = ("int8 gemm", "float gemm", "convert", "other xnnpack", "outside")
_GEMMS = ("Fully Connected", "Convolution", "Batch Matrix Multiply", "Deconvolution")
# XNNPACK's names: QS8/QU8 static int8 activations, QD8/QDU8/QP8 dynamic ones, QC8W/QC4W/QB4W
# int8/int4 weights; "QC8" alone is its older name for qs8 activations with per-channel
# int8 weights (convolutions).
_INTEGER = re.compile(r"\b(QS8|QU8|QD8|QDU8|QP8|QC8|QC8W|QC4W|QB4W)\b")
_CALL = re.compile(r"\s+#\d+$")
_EXECUTE = "Method::execute"


def op_kind(name: str) -> str:
    """An XNNPACK operator's kind: its event name without the trailing ``#N``."""
    return _CALL.sub("", name)


def category(kind: str) -> str:
    """One of CATEGORIES for an XNNPACK operator kind."""
    if kind.startswith("Convert"):
        return "convert"
    if kind.startswith(_GEMMS):
        return "int8 gemm" if _INTEGER.search(kind) else "float gemm"
    return "other xnnpack"


@dataclass(frozen=True)
class OpProfile:
    """Median milliseconds per forward: ``kinds`` per operator kind (summed over its
    calls), ``total`` the whole method. ``calls``: operators of each kind."""

    total_ms: float
    kinds: dict[str, float]
    calls: dict[str, int] = field(default_factory=dict)

    @property
    def categories(self) -> dict[str, float]:
        return categorize(self.kinds, self.total_ms)

    def shares(self) -> dict[str, float]:
        """Each category's share of the method's time, in percent."""
        return {c: 100.0 * ms / self.total_ms for c, ms in self.categories.items()} if self.total_ms else {}

    def top(self, n: int) -> list[tuple[str, float]]:
        return sorted(self.kinds.items(), key=lambda kv: -kv[1])[:n]

    def as_dict(self) -> dict[str, object]:
        return {
            "total_ms": round(self.total_ms, 3),
            "kinds_ms": {k: round(v, 3) for k, v in sorted(self.kinds.items(), key=lambda kv: -kv[1])},
            "calls": self.calls,
        }


def categorize(kinds: dict[str, float], total_ms: float) -> dict[str, float]:
    """Milliseconds per category of CATEGORIES from per-kind milliseconds."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for kind, ms in kinds.items():
        out[category(kind)] += ms
    out["outside"] = max(0.0, total_ms - sum(kinds.values()))
    return out


def profile_pte(pte: str | Path, inputs: Sequence[torch.Tensor], runs: int = 5, threads: int = 1) -> OpProfile:
    """Runs ``forward`` ``runs`` times (after one warm-up) with an ETDump tracer; per-kind
    times are the median over runs of each run's sum over the kind's calls."""
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib

    if runs < 1:
        raise ValueError(f"runs={runs}: profile at least one run")
    portable_lib._unsafe_reset_threadpool(threads)
    module = portable_lib._load_for_executorch(str(pte), enable_etdump=True, debug_buffer_size=0)
    args = [t.detach().contiguous() for t in inputs]
    for _ in range(runs + 1):
        module.run_method("forward", args)
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "profile.etdp"
        module.write_etdump_result_to_file(str(dump))
        inspector = Inspector(etdump_path=str(dump))
    per_run: dict[str, list[float]] = defaultdict(lambda: [0.0] * (runs + 1))
    calls: dict[str, int] = defaultdict(int)
    total: list[float] = []
    for block in inspector.event_blocks:
        for event in block.events:
            raw = [] if event.perf_data is None else list(event.perf_data.raw)
            if event.name == _EXECUTE:
                total = raw
            elif event.is_delegated_op and len(raw) == runs + 1:
                kind = op_kind(event.name)
                calls[kind] += 1
                for i, ms in enumerate(raw):
                    per_run[kind][i] += ms
    if len(total) != runs + 1:
        raise RuntimeError(f"the ETDump of {pte} has no {_EXECUTE} timing for each of its {runs + 1} runs")
    # the first run is the warm-up: XNNPACK packs weights and sizes its workspace there
    kinds = {k: statistics.median(v[1:]) for k, v in per_run.items()}
    return OpProfile(statistics.median(total[1:]), kinds, dict(calls))
