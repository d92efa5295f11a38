"""A mergeable activation histogram and the clipping thresholds searched over it.

The histogram covers [-R, R) with R a power of two and 2N equal bins (N a power of two),
so every bin width is a power of two. When a later batch exceeds R, R doubles and pairs
of bins merge. Because floor(floor(x / w) / 2) == floor(x / 2w) exactly, a histogram
accumulated over batches equals, bin for bin, the histogram of the concatenated data.
That makes calibration independent of how the data was batched (and shardable).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "SignedHistogram",
    "entropy_threshold",
    "mse_threshold",
    "percentile_threshold",
    "quantization_mse",
]

_EMPTY_LOG2_RANGE = -149  # float32's smallest subnormal: a batch of zeros after real data
_MSE_GRID = 200  # candidate thresholds T = max * j / _MSE_GRID, j = 1.._MSE_GRID
_KL_CANDIDATES = 256  # at most this many KL thresholds are evaluated


class SignedHistogram:
    """Counts of x over 2N bins of [-2**log2_range, 2**log2_range).

    Args:
        bins: N, bins per sign; a power of two.
    """

    def __init__(self, bins: int) -> None:
        self.bins = bins
        self.counts = torch.zeros(2 * bins, dtype=torch.int64)
        self.log2_range: int | None = None
        self.pending_zeros = 0

    @property
    def total(self) -> int:
        return int(self.counts.sum()) + self.pending_zeros

    @property
    def bin_width(self) -> float:
        if self.log2_range is None:
            return 0.0
        return math.ldexp(1.0, self.log2_range) / self.bins

    def update(self, x: torch.Tensor) -> None:
        """Adds the finite values of x (float) to the histogram."""
        x = x.detach().reshape(-1).to(torch.float32)
        if x.numel() == 0:
            return
        amax = float(x.abs().max())
        if amax == 0.0 and self.log2_range is None:
            # Only zeros so far: any range would do now but could be too coarse for a later
            # tiny batch, so wait; zeros always land in bin N whatever the range.
            self.pending_zeros += x.numel()
            return
        # frexp: amax = m * 2**e with m in [0.5, 1), so 2**e is the smallest power of two > amax.
        needed = math.frexp(amax)[1] if amax > 0 else _EMPTY_LOG2_RANGE
        if self.log2_range is None:
            self.log2_range = needed
        elif needed > self.log2_range:
            self._coarsen(needed - self.log2_range)
            self.log2_range = needed
        # float64: the width can be below float32's smallest subnormal for tiny tensors;
        # division by a power of two is exact in either precision otherwise.
        idx = torch.floor(x.double() / self.bin_width).to(torch.int64) + self.bins
        self.counts += torch.bincount(idx, minlength=2 * self.bins)
        if self.pending_zeros:
            self.counts[self.bins] += self.pending_zeros
            self.pending_zeros = 0

    def _coarsen(self, doublings: int) -> None:
        # Bin i covers [(i - N) w, (i - N + 1) w); after k doublings it is bin floor((i - N) / 2**k) + N.
        factor = 1 << min(doublings, 62)
        offset = torch.arange(2 * self.bins, dtype=torch.int64) - self.bins
        target = torch.div(offset, factor, rounding_mode="floor") + self.bins
        merged = torch.zeros_like(self.counts)
        merged.index_add_(0, target, self.counts)
        self.counts = merged

    def folded(self) -> tuple[np.ndarray, float]:
        """Histogram of |x|: counts a[b] for |x| in [b w, (b + 1) w], and the width w."""
        c = self.counts.numpy().astype(np.float64)
        n = self.bins
        if self.pending_zeros:
            c = c.copy()
            c[n] += self.pending_zeros
        return c[n:] + c[:n][::-1], self.bin_width

    def state(self) -> dict[str, object]:
        return {"counts": self.counts.clone(), "log2_range": self.log2_range, "pending_zeros": self.pending_zeros}

    def load(self, state: dict[str, object]) -> None:
        counts = state["counts"]
        if not isinstance(counts, torch.Tensor) or counts.numel() != 2 * self.bins:
            raise ValueError(
                f"histogram state has {getattr(counts, 'numel', lambda: '?')()} bins, "
                f"expected {2 * self.bins}: it was saved with another histogram_bins"
            )
        self.counts = counts.clone()
        log2_range, pending = state["log2_range"], state.get("pending_zeros", 0)
        if not (log2_range is None or isinstance(log2_range, int)) or not isinstance(pending, int):
            raise ValueError(f"histogram state has log2_range={log2_range!r}, pending_zeros={pending!r}: not integers")
        self.log2_range = log2_range
        self.pending_zeros = pending


def percentile_threshold(folded: np.ndarray, width: float, amax: float, percentile: float) -> float:
    """Smallest bin edge below which `percentile` % of |x| lies, never above amax."""
    total = folded.sum()
    if total == 0 or amax == 0.0:
        return amax
    cdf = np.cumsum(folded) / total
    b = int(np.searchsorted(cdf, percentile / 100.0 - 1e-12, side="left"))
    return min((b + 1) * width, amax)


def quantization_mse(values: np.ndarray, weights: np.ndarray, thresholds: np.ndarray, qmax: int) -> np.ndarray:
    """Mean squared symmetric quantization error of |x| for each candidate threshold.

    Args:
        values: |x| sample points, shape (B,).
        weights: how many samples each point stands for, shape (B,).
        thresholds: clipping values T, shape (G,); scale = T / qmax.
        qmax: largest positive integer level (127 or 7).

    Returns:
        Weighted mean of (x - Q_T(x))**2, shape (G,).
    """
    scale = (thresholds / qmax)[:, None]  # (G, 1)
    q = np.clip(np.round(values[None, :] / scale), 0, qmax) * scale  # (G, B)
    err = (values[None, :] - q) ** 2
    return (err * weights[None, :]).sum(axis=1) / max(weights.sum(), 1.0)


def mse_threshold(folded: np.ndarray, width: float, amax: float, qmax: int) -> float:
    """Clipping value in (0, amax] that minimises the tensor's own quantization MSE.

    Sweeps T = amax * j / 200 (j = 1..200, the last being Max) and evaluates each on the
    bin centres; ties go to the larger T, i.e. less clipping.
    """
    if amax == 0.0 or folded.sum() == 0:
        return amax
    nz = np.nonzero(folded)[0]
    centres = np.minimum((nz + 0.5) * width, amax)
    grid = amax * np.arange(1, _MSE_GRID + 1) / _MSE_GRID
    mse = quantization_mse(centres, folded[nz], grid, qmax)
    best = np.flatnonzero(mse <= mse.min() * (1 + 1e-12))[-1]
    return float(grid[best])


def entropy_threshold(folded: np.ndarray, width: float, amax: float, qmax: int) -> float:
    """Clipping value minimising KL(P || Q) between the clipped histogram and its
    quantized version (TensorRT's entropy calibrator, on |x| with qmax + 1 levels)."""
    levels = qmax + 1
    nz = np.nonzero(folded)[0]
    if amax == 0.0 or nz.size == 0:
        return amax
    last = int(nz[-1]) + 1  # bins beyond the data add nothing
    if last <= levels:
        return amax
    step = max(1, (last - levels) // _KL_CANDIDATES)
    best_i, best_kl = last, math.inf
    for i in range(levels, last + 1, step):
        kl = _clipped_kl(folded, i, levels)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return min(best_i * width, amax)


def _clipped_kl(folded: np.ndarray, i: int, levels: int) -> float:
    # P: first i bins, with the clipped tail folded into the last one.
    p = folded[:i].copy()
    p[-1] += folded[i:].sum()
    # Q: the first i bins merged into `levels` groups, each group's mass spread evenly
    # over its non-empty bins (empty bins stay empty, as in TensorRT).
    groups = np.minimum((np.arange(i) * levels) // i, levels - 1)
    nonzero = (folded[:i] > 0).astype(np.float64)
    mass = np.bincount(groups, weights=folded[:i], minlength=levels)
    support = np.bincount(groups, weights=nonzero, minlength=levels)
    q = np.where(nonzero > 0, mass[groups] / np.maximum(support[groups], 1.0), 0.0)
    p_sum, q_sum = p.sum(), q.sum()
    if q_sum == 0:
        return math.inf
    p, q = p / p_sum, q / q_sum
    mask = p > 0
    # A bin with P > 0 and Q == 0 (the folded tail) gets a tiny Q rather than infinity.
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
