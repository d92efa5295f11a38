"""What a transform did at one site of the graph, for the quantization report."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esc_ao.observers import NonFiniteActivationError

__all__ = ["TransformRecord", "check_finite"]


@dataclass(frozen=True)
class TransformRecord:
    """One site: the producing node, the transform, whether it was applied, and why (the
    chosen parameters, or the reason it was skipped)."""

    node: str
    transform: str
    applied: bool
    detail: str


def check_finite(x: torch.Tensor, transform: str, node: str) -> None:
    """Raises NonFiniteActivationError when a tensor a transform measures holds NaN or Inf:
    its statistics would silently write non-finite weights."""
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteActivationError(
            f"{transform}: the calibration batches give NaN or Inf at {node}: check them (and the float model "
            "on them) for non-finite values before transforming"
        )
