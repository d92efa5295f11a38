"""Lowering converted graphs to integer kernels: ExecuTorch XNNPACK .pte files and CUDA.

The ExecuTorch names load on first use, so the CUDA path (``esc_ao.lower.cuda``) works
where ExecuTorch is not installed (a GPU server has no use for it).
"""

from __future__ import annotations

import importlib
from typing import Any

from esc_ao.report import tensor_sqnr_db

__all__ = ["LoweringError", "LoweringResult", "run_pte", "tensor_sqnr_db", "to_executorch"]

_EXECUTORCH_NAMES = frozenset({"LoweringError", "LoweringResult", "run_pte", "to_executorch"})


def __getattr__(name: str) -> Any:
    if name in _EXECUTORCH_NAMES:
        return getattr(importlib.import_module("esc_ao.lower.executorch"), name)
    raise AttributeError(f"module 'esc_ao.lower' has no attribute {name!r}")
