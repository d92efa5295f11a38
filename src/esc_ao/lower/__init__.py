"""Lowering converted graphs to integer kernels: ExecuTorch XNNPACK .pte files and CUDA."""

from esc_ao.lower.executorch import LoweringError, LoweringResult, run_pte, tensor_sqnr_db, to_executorch

__all__ = ["LoweringError", "LoweringResult", "run_pte", "tensor_sqnr_db", "to_executorch"]
