"""What a transform did at one site of the graph, for the quantization report."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TransformRecord"]


@dataclass(frozen=True)
class TransformRecord:
    """One site: the producing node, the transform, whether it was applied, and why (the
    chosen parameters, or the reason it was skipped)."""

    node: str
    transform: str
    applied: bool
    detail: str
