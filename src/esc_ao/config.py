"""Frozen, validated configuration of a quantization run.

Every field is checked in ``__post_init__`` so a bad value fails where it is written,
with a message that names the value and the fix, not deep inside ``prepare_pt2e``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["METHODS", "QuantConfig"]

# Activation calibration methods, in the order of the ESC paper's baselines.
METHODS: tuple[str, ...] = ("max", "percentile", "entropy", "mse", "esc")
_BITS: tuple[int, ...] = (4, 8)


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """What to quantize and how.

    Args:
        weight_bits: 8 or 4. Weights are per-channel symmetric on the output channel.
        act_bits: 8 or 4. Activations are per-tensor; 4-bit grids are int8 tensors
            restricted to [-8, 7] so int8 kernels can execute them exactly.
        method: activation calibration method, one of ``METHODS``.
        act_symmetric: symmetric activation grids (zero point 0, the paper's choice);
            False gives affine grids with a zero point.
        percentile: the |x| percentile the "percentile" method clips at.
        histogram_bins: bins per sign of the activation histograms that the
            percentile, entropy, mse and esc methods search.
    """

    weight_bits: int = 8
    act_bits: int = 8
    method: str = "esc"
    act_symmetric: bool = True
    percentile: float = 99.99
    histogram_bins: int = 2048

    def __post_init__(self) -> None:
        for field, value in (("weight_bits", self.weight_bits), ("act_bits", self.act_bits)):
            if isinstance(value, bool) or value not in _BITS:
                raise ValueError(
                    f"QuantConfig.{field}={value!r} is not supported: use 8 or 4 "
                    "(4-bit grids run on int8 kernels restricted to [-8, 7])."
                )
        if self.method not in METHODS:
            raise ValueError(
                f"QuantConfig.method={self.method!r} is unknown: use one of {', '.join(METHODS)}."
            )
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(
                f"QuantConfig.percentile={self.percentile!r} must lie in (50, 100], e.g. 99.99."
            )
        bins = self.histogram_bins
        if bins < 64 or bins & (bins - 1):
            raise ValueError(
                f"QuantConfig.histogram_bins={bins!r} must be a power of two >= 64, e.g. 2048 "
                "(power-of-two bins let batches merge exactly)."
            )

    @property
    def label(self) -> str:
        """Short name such as ``w8a8``."""
        return f"w{self.weight_bits}a{self.act_bits}"
