"""torchao PT2E observers for speech-model activations and weights.

Activation observers (per-tensor) share one statistic, a mergeable histogram of the tensor
(see ``histogram.py``), and differ only in how they pick the clipping threshold T:

* ``MaxObserver``: T = max |x|.
* ``PercentileObserver``: T = the given percentile of |x| (default 99.99).
* ``EntropyObserver``: T minimising KL(P || Q) (TensorRT's calibrator).
* ``MSEObserver``: T minimising the tensor's own quantization MSE.
* ``EscObserver``: starts from the MSE threshold and exposes its scale as a settable
  parameter, so a search can write a candidate and evaluate the model in one forward.

Every observer has two switches: ``observing`` (record statistics) and ``fake_quant``
(return the quantize-dequantize of x with the current scale, computed exactly as
``convert_pt2e``'s quantize_per_tensor / dequantize_per_tensor pair does). With observing
off and fake_quant on, the prepared model *is* the quantized model, so per-layer SQNR and
search candidates cost one forward pass and no convert.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import torch
from torchao.quantization.pt2e.observer import ObserverBase, UniformQuantizationObserverBase

from esc_ao.graph_prep import resolve_attr
from esc_ao.histogram import (
    SignedHistogram,
    entropy_threshold,
    mse_threshold,
    percentile_threshold,
)

__all__ = [
    "ActivationObserver",
    "EntropyObserver",
    "EscObserver",
    "GroupWeightObserver",
    "MSEObserver",
    "MaxObserver",
    "NonFiniteActivationError",
    "PerChannelWeightObserver",
    "PercentileObserver",
    "iter_observers",
    "observer_mode",
    "qrange",
]

log = logging.getLogger(__name__)


class NonFiniteActivationError(ValueError):
    """A calibration batch produced NaN or Inf at an observed tensor."""


def qrange(bits: int, *, weight: bool = False) -> tuple[int, int]:
    """Integer grid of a tensor: int8 [-128, 127] (weights [-127, 127], symmetric as
    XNNPACK expects), a 4-bit grid stored in int8, [-8, 7], or int16 [-32768, 32767]
    (activations only: the residual stream's grid)."""
    if bits == 16 and not weight:
        return (-32768, 32767)
    if bits == 8:
        return (-127, 127) if weight else (-128, 127)
    if bits == 4:
        return (-8, 7)
    raise ValueError(
        f"bits={bits!r} is not supported{' for weights' if weight else ''}: use 8 or 4"
        f"{'' if weight else ' (or 16 for activations)'}"
    )


def fake_quantize(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """quantize_per_tensor followed by dequantize_per_tensor, op for op as convert_pt2e
    emits them (multiply by 1/scale, round half to even, add the zero point, clamp,
    subtract it, multiply by scale), so the simulated and the converted model agree bit
    for bit. In place on one new buffer: measured 4x faster than the out-of-place chain
    and than torch.fake_quantize_per_tensor_affine on CPU, which matters because every
    search candidate runs it on every activation (attention probabilities included)."""
    y = x.float() * (1.0 / scale)
    y.round_().add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _as_float32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


class ActivationObserver(UniformQuantizationObserverBase):
    """Per-tensor activation observer; subclasses choose the clipping threshold.

    Built by ``prepare_pt2e`` from a QuantizationSpec's fields (dtype, quant_min,
    quant_max, qscheme, ...) plus the keyword arguments bound with ``with_args``.
    """

    method = "max"
    _needs_histogram = True

    def __init__(
        self,
        dtype: torch.dtype = torch.int8,
        qscheme: torch.qscheme = torch.per_tensor_symmetric,
        quant_min: int | None = -128,
        quant_max: int | None = 127,
        *,
        histogram_bins: int = 2048,
        percentile: float = 99.99,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("ch_axis", None)
        super().__init__(dtype=dtype, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max, **kwargs)
        if qscheme not in (torch.per_tensor_symmetric, torch.per_tensor_affine):
            raise ValueError(f"{type(self).__name__} is per-tensor; got qscheme={qscheme}")
        self.percentile = percentile
        self.histogram = SignedHistogram(histogram_bins)
        self.min_val: torch.Tensor
        self.max_val: torch.Tensor
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.label = "unlabelled"  # set by the quantizer: the graph edge this observer watches
        self.observing = True
        self.fake_quant = False
        self._scale_override: float | None = None
        self._cached: tuple[float, int] | None = None

    @property
    def symmetric(self) -> bool:
        return self.qscheme == torch.per_tensor_symmetric

    @property
    def seen(self) -> bool:
        return bool(torch.isfinite(self.min_val))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._observe(x)
        if self.fake_quant:
            scale, zp = self.qparams()
            return fake_quantize(x, scale, zp, self.quant_min, self.quant_max)
        return x

    def _observe(self, x: torch.Tensor) -> None:
        xd = x.detach()
        if xd.numel() == 0:
            return
        if not bool(torch.isfinite(xd).all()):
            bad = "NaN" if bool(torch.isnan(xd).any()) else "Inf"
            raise NonFiniteActivationError(
                f"calibration produced {bad} at {self.label}: check the calibration batches "
                "(and the float model on them) for non-finite values before calibrating"
            )
        self.min_val = torch.minimum(self.min_val, xd.min().float())
        self.max_val = torch.maximum(self.max_val, xd.max().float())
        if self._needs_histogram:
            self.histogram.update(xd)
        self._cached = None

    # --- thresholds --------------------------------------------------------------
    @property
    def amax(self) -> float:
        if not self.seen:
            return 0.0
        return max(abs(float(self.min_val)), abs(float(self.max_val)))

    def threshold(self) -> float:
        """Clipping value T on |x| chosen by this observer's method."""
        return self.amax

    def clip_range(self) -> tuple[float, float]:
        """Range [lo, hi] that the integer grid covers (symmetric: [-T, T])."""
        t = self.threshold()
        if self.symmetric:
            return -t, t
        lo = max(float(self.min_val), -t) if self.seen else 0.0
        hi = min(float(self.max_val), t) if self.seen else 0.0
        return min(lo, 0.0), max(hi, 0.0)

    def method_qparams(self) -> tuple[float, int]:
        """(scale, zero_point) from the statistics alone, ignoring any override."""
        lo, hi = self.clip_range()
        eps = float(self.eps)
        if self.symmetric and self.seen and float(self.min_val) >= 0.0:
            # A tensor that never goes negative (softmax probabilities, ReLU outputs)
            # would waste the negative half of a symmetric grid: give [0, T] all levels,
            # zero point at quant_min. The grid stays symmetric in spirit (0 is exact).
            return max(hi / (self.quant_max - self.quant_min), eps), self.quant_min
        if self.symmetric:
            # Symmetric grid: 0 maps to 0 and +T to quant_max (127, or 7 at 4 bits).
            return max(hi / self.quant_max, eps), 0
        scale = max((hi - lo) / (self.quant_max - self.quant_min), eps)
        zp = int(round(self.quant_min - lo / scale))
        return scale, min(max(zp, self.quant_min), self.quant_max)

    def qparams(self) -> tuple[float, int]:
        """(scale, zero_point) in force: the override if one is set, else the method's."""
        if self._cached is None:
            scale, zp = self.method_qparams()
            if self._scale_override is not None:
                scale = self._scale_override
            # convert_pt2e stores the scale as float32: simulate with exactly that value.
            self._cached = (_as_float32(scale), zp)
        return self._cached

    # --- the scale a search may set -------------------------------------------------
    @property
    def init_scale(self) -> float:
        """The scale the statistics give (the search's starting point), as float32."""
        return _as_float32(self.method_qparams()[0])

    @property
    def scale(self) -> float:
        """The scale in force."""
        return self.qparams()[0]

    def set_scale(self, scale: float | None) -> None:
        """Overrides the scale (``None`` goes back to the statistics' scale)."""
        if scale is not None and not (0.0 < scale < float("inf")):
            raise ValueError(f"scale={scale!r} for {self.label} must be finite and > 0")
        self._scale_override = None if scale is None else float(scale)
        self._cached = None

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        scale, zp = self.qparams()
        return torch.tensor([scale], dtype=torch.float32), torch.tensor([zp], dtype=torch.int32)

    def _folded(self) -> tuple[Any, float]:
        return self.histogram.folded()

    def extra_repr(self) -> str:
        return f"method={self.method}, label={self.label}, qrange=[{self.quant_min}, {self.quant_max}]"


class MaxObserver(ActivationObserver):
    """T = max |x| (exact running min/max; no histogram needed)."""

    method = "max"
    _needs_histogram = False


class PercentileObserver(ActivationObserver):
    """T = the ``percentile`` of |x| over all batches (histogram resolution)."""

    method = "percentile"

    def threshold(self) -> float:
        folded, width = self._folded()
        return percentile_threshold(folded, width, self.amax, self.percentile)


class EntropyObserver(ActivationObserver):
    """T minimising the KL divergence between the clipped and quantized histograms."""

    method = "entropy"

    def threshold(self) -> float:
        folded, width = self._folded()
        return entropy_threshold(folded, width, self.amax, self.quant_max)


class MSEObserver(ActivationObserver):
    """T minimising the tensor's own quantization MSE (swept over multiples of max)."""

    method = "mse"

    def threshold(self) -> float:
        folded, width = self._folded()
        return mse_threshold(folded, width, self.amax, self.quant_max)


class EscObserver(MSEObserver):
    """ESC's observer: the tensor's MSE threshold as the starting point of the search
    (``esc_ao.search.calibrate`` refines it with the layer-output MSE, then CMA-ES)."""

    method = "esc"


class PerChannelWeightObserver(UniformQuantizationObserverBase):
    """Per-output-channel symmetric weight observer: scale_c = max|w_c| / quant_max.

    Unlike torch's symmetric formula (max / ((qmax - qmin) / 2), i.e. max / 7.5 at 4 bits,
    which clips the largest weight to 7), this maps the largest weight exactly onto
    quant_max. The class name contains "PerChannel" so prepare_pt2e passes ch_axis.
    """

    def __init__(
        self,
        dtype: torch.dtype = torch.int8,
        qscheme: torch.qscheme = torch.per_channel_symmetric,
        quant_min: int | None = -127,
        quant_max: int | None = 127,
        ch_axis: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(dtype=dtype, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max, **kwargs)
        self.ch_axis = ch_axis
        self.absmax: torch.Tensor
        self.register_buffer("absmax", torch.tensor([]))
        self.label = "unlabelled"
        self.observing = True
        self.fake_quant = False
        self._fq_cache: tuple[tuple[int, int, tuple[int, ...]], torch.Tensor] | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.observing:
            amax = self._absmax_of(w)
            self.absmax = amax if self.absmax.numel() == 0 else torch.maximum(self.absmax, amax)
        if self.fake_quant:
            # Weights do not change during a search: quantize once per weight version.
            key = (w.data_ptr(), w._version, tuple(w.shape))
            if self._fq_cache is None or self._fq_cache[0] != key or self.observing:
                self._fq_cache = (key, self._dequantize(self._quantize(w)))
            return self._fq_cache[1]
        return w

    def _absmax_of(self, w: torch.Tensor) -> torch.Tensor:
        """max |w| per scale: one per output channel here."""
        wd = w.detach().float().transpose(0, self.ch_axis).reshape(w.shape[self.ch_axis], -1)
        if not bool(torch.isfinite(wd).all()):
            raise NonFiniteActivationError(f"weight {self.label} has NaN or Inf values")
        return wd.abs().amax(dim=1)

    def _quantize(self, w: torch.Tensor) -> torch.Tensor:
        scale, zp = self.calculate_qparams()
        return torch.ops.quantized_decomposed.quantize_per_channel(
            w, scale, zp, self.ch_axis, self.quant_min, self.quant_max, torch.int8
        )

    def _dequantize(self, q: torch.Tensor) -> torch.Tensor:
        scale, zp = self.calculate_qparams()
        return torch.ops.quantized_decomposed.dequantize_per_channel(
            q, scale, zp, self.ch_axis, self.quant_min, self.quant_max, torch.int8
        )

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        if self.absmax.numel() == 0:
            raise RuntimeError(f"weight observer {self.label} has seen no weight: run the model once")
        scale = torch.clamp(self.absmax / self.quant_max, min=float(self.eps))
        return scale, torch.zeros_like(scale, dtype=torch.int64)


class GroupWeightObserver(PerChannelWeightObserver):
    """Group-wise symmetric weight observer for a linear's (out, in) weight: one scale
    per output channel and per ``group_size`` consecutive input channels,
    scale = max|w_group| / quant_max. Converts to quantized_decomposed's
    quantize_per_channel_group / dequantize_per_channel_group pair (the weight format of
    ExecuTorch's 8da4w export), with scales of shape (out, in / group_size)."""

    def __init__(self, group_size: int = 32, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.group_size = group_size

    def _groups(self, w: torch.Tensor) -> torch.Tensor:
        if w.dim() != 2 or w.shape[1] % self.group_size:
            raise ValueError(
                f"weight {self.label} of shape {tuple(w.shape)} cannot take groups of "
                f"{self.group_size}: a 2-D (out, in) weight with in a multiple of the group is needed"
            )
        return w.detach().float().reshape(w.shape[0], -1, self.group_size)

    def _absmax_of(self, w: torch.Tensor) -> torch.Tensor:
        groups = self._groups(w)
        if not bool(torch.isfinite(groups).all()):
            raise NonFiniteActivationError(f"weight {self.label} has NaN or Inf values")
        return groups.abs().amax(dim=2)

    def _quantize(self, w: torch.Tensor) -> torch.Tensor:
        scale, zp = self.calculate_qparams()
        return torch.ops.quantized_decomposed.quantize_per_channel_group(
            w, scale, zp, self.quant_min, self.quant_max, torch.int8, self.group_size
        )

    def _dequantize(self, q: torch.Tensor) -> torch.Tensor:
        scale, zp = self.calculate_qparams()
        return torch.ops.quantized_decomposed.dequantize_per_channel_group(
            q, scale, zp, self.quant_min, self.quant_max, torch.int8, self.group_size, torch.float32
        )

    def convert(self, model: torch.fx.GraphModule, node: torch.fx.Node) -> None:
        """Replaces this observer's node by the group quantize/dequantize pair (called by
        convert_pt2e for observers that define ``convert``). The weight is quantized here,
        once, so the program holds int8 levels, not the float weight."""
        weight_node = node.args[0]
        if not (isinstance(weight_node, torch.fx.Node) and weight_node.op == "get_attr"):
            raise ValueError(
                f"group-wise weight observer {self.label} must watch a weight attribute, " f"not {weight_node}"
            )
        weight = resolve_attr(model, str(weight_node.target))
        scale, zp = self.calculate_qparams()
        stem = str(node.target)
        for suffix, value in (
            ("_group_int", self._quantize(weight.detach())),
            ("_group_scale", scale),
            ("_group_zero_point", zp),
        ):
            model.register_buffer(stem + suffix, value)
        graph = model.graph
        with graph.inserting_before(node):
            q, s, z = (graph.get_attr(stem + sfx) for sfx in ("_group_int", "_group_scale", "_group_zero_point"))
            dq = graph.call_function(
                torch.ops.quantized_decomposed.dequantize_per_channel_group.default,
                (q, s, z, self.quant_min, self.quant_max, torch.int8, self.group_size, torch.float32),
            )
        dq.meta = dict(node.meta)
        node.replace_all_uses_with(dq)
        graph.erase_node(node)


Observer = ActivationObserver | PerChannelWeightObserver


def iter_observers(model: torch.nn.Module) -> Iterator[tuple[str, Observer]]:
    """The observers of a prepared model that have the observing / fake_quant switches
    (esc_ao's own and the search wrappers), by module name."""
    for name, module in model.named_modules():
        # Duck-typed on the two switches so esc_ao.search.space.SearchableObserver (which wraps
        # foreign observers) is switched too.
        if isinstance(module, ObserverBase) and hasattr(module, "fake_quant") and hasattr(module, "observing"):
            yield name, module


class observer_mode:  # noqa: N801 - used as a context manager, reads like a function
    """Context manager switching every esc_ao observer of a model, restored on exit.

    Example:
        with observer_mode(prepared, observing=False, fake_quant=True):
            y_q = prepared(x)   # the quantized model, simulated
    """

    def __init__(self, model: torch.nn.Module, *, observing: bool, fake_quant: bool) -> None:
        self._observers = [obs for _, obs in iter_observers(model)]
        self._new = (observing, fake_quant)
        self._old: list[tuple[bool, bool]] = []

    def __enter__(self) -> "observer_mode":
        self._old = [(o.observing, o.fake_quant) for o in self._observers]
        for o in self._observers:
            o.observing, o.fake_quant = self._new
        return self

    def __exit__(self, *exc: object) -> None:
        for o, (observing, fake_quant) in zip(self._observers, self._old):
            o.observing, o.fake_quant = observing, fake_quant
