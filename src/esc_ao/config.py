"""Frozen, validated configuration of a quantization run.

Every field is checked in ``__post_init__`` so a bad value fails where it is written,
with a message that names the value and the fix, not deep inside ``prepare_pt2e``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["BIT_LABELS", "METHODS", "QuantConfig", "SearchConfig"]

# Activation calibration methods, in the order of the ESC paper's baselines.
METHODS: tuple[str, ...] = ("max", "percentile", "entropy", "mse", "esc")
_BITS: tuple[int, ...] = (4, 8)
# The bit-width combinations the benchmarks and commands offer (QuantConfig.label's form).
BIT_LABELS: tuple[str, ...] = ("w8a8", "w4a8", "w4a4")


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """What to quantize and how.

    Args:
        weight_bits: 8 or 4. Weights are per-channel symmetric on the output channel.
        weight_group: None (one scale per output channel), or a group size: a linear's
            weight then gets one scale per output channel and per ``weight_group``
            consecutive input channels (group-wise weights, as int4 LLM and 8da4w
            schemes use; Qualcomm's block quantization). A linear whose input width is
            not a multiple of it, and every conv, keeps per-channel weights.
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
    weight_group: int | None = None
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
        group = self.weight_group
        if group is not None and (
            isinstance(group, bool) or not isinstance(group, int) or group < 8 or group & (group - 1)
        ):
            raise ValueError(
                f"QuantConfig.weight_group={group!r} must be None (per-channel weights) or a power of two "
                ">= 8, e.g. 32, 64 or 128."
            )
        if self.method not in METHODS:
            raise ValueError(f"QuantConfig.method={self.method!r} is unknown: use one of {', '.join(METHODS)}.")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"QuantConfig.percentile={self.percentile!r} must lie in (50, 100], e.g. 99.99.")
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

    @classmethod
    def from_label(cls, label: str, **fields: object) -> "QuantConfig":
        """``QuantConfig.from_label("w4a8", method="mse")``: the bit widths of a label such
        as ``label`` gives, the other fields as keywords."""
        match = re.fullmatch(r"w(\d+)a(\d+)", label) if isinstance(label, str) else None
        if match is None:
            raise ValueError(f"bit label {label!r} is not of the form 'w<bits>a<bits>', e.g. 'w4a8'")
        return cls(weight_bits=int(match.group(1)), act_bits=int(match.group(2)), **fields)  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """ESC's search: the local MSE step, then CMA-ES over log scale multipliers.

    Args:
        sigma0: initial CMA-ES step size in log-scale units (the paper's 0.1).
        popsize: candidates per generation; None takes pycma's default 4 + 3 ln(N).
        budget: CMA-ES generations (the paper's budget of 100); 0 runs the local step only.
        seed: seeds pycma (and so every candidate); the same seed gives the same scales.
        log_bounds: bounds of log(scale / local-step scale) for every dimension.
        final: "mean" takes the mean of the last search distribution (paper); "best"
            takes the best candidate evaluated.
        local_grid: candidate scales per tensor in the local step.
        local_batches: calibration batches the local step uses (it keeps every
            intermediate tensor of a batch in memory).
        progress: show a progress bar per generation.
        stages: 1 searches all scales at once (the paper's flat search); N > 1 first
            searches the graph in up to N stages in order, each with everything before it
            cached (esc_ao.search.staged), and starts the flat search from the result.
        stage_budget: CMA-ES generations per stage (staged search only).
        subsample: calibration batches each generation scores (the same subset for every
            candidate of a generation, drawn from the seed); None scores all. The search's
            start and its result are always compared on all batches.
        dist_timeout_s: under torchrun, how long a collective may wait for another rank
            before the survivors fail with DistributedError.
    """

    sigma0: float = 0.1
    popsize: int | None = None
    budget: int = 100
    seed: int = 0
    log_bounds: tuple[float, float] = (-3.0, 1.0)
    final: str = "mean"
    local_grid: int = 16
    local_batches: int = 1
    progress: bool = True
    stages: int = 1
    stage_budget: int = 8
    subsample: int | None = None
    # Long enough for the longest stretch between collectives (the local step, over 120 s
    # for Whisper's encoder on one thread, shared by the ranks); a rank that dies is still
    # detected at once by gloo's closed connection.
    dist_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if not 0.0 < self.sigma0 <= 2.0:
            raise ValueError(f"SearchConfig.sigma0={self.sigma0!r} must lie in (0, 2]; the paper uses 0.1")
        if self.popsize is not None and (isinstance(self.popsize, bool) or self.popsize < 4):
            raise ValueError(f"SearchConfig.popsize={self.popsize!r} is below CMA-ES's minimum of 4 (or use None)")
        if isinstance(self.budget, bool) or self.budget < 0:
            raise ValueError(f"SearchConfig.budget={self.budget!r} must be >= 0 generations (0: local step only)")
        lo, hi = self.log_bounds
        if not lo < 0.0 < hi:
            raise ValueError(f"SearchConfig.log_bounds={self.log_bounds!r} must bracket 0, e.g. (-3.0, 1.0)")
        if self.final not in ("mean", "best"):
            raise ValueError(f"SearchConfig.final={self.final!r}: use 'mean' (paper) or 'best'")
        if isinstance(self.stages, bool) or self.stages < 1:
            raise ValueError(f"SearchConfig.stages={self.stages!r} must be >= 1 (1: the flat search only)")
        if isinstance(self.stage_budget, bool) or self.stage_budget < 0:
            raise ValueError(f"SearchConfig.stage_budget={self.stage_budget!r} must be >= 0 generations per stage")
        if self.subsample is not None and (isinstance(self.subsample, bool) or self.subsample < 1):
            raise ValueError(f"SearchConfig.subsample={self.subsample!r} must be >= 1 batch (or None: all)")
        if self.local_grid < 2 or self.local_batches < 1:
            raise ValueError(
                f"SearchConfig.local_grid={self.local_grid!r} must be >= 2 and "
                f"local_batches={self.local_batches!r} >= 1"
            )
