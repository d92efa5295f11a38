"""The dimensions ESC searches: one per-tensor activation scale per observer in a prepared
graph, whichever quantizer prepared it.

esc_ao's own activation observers already have a settable scale and a fake-quant switch.
Any other observer (torchao's HistogramObserver / MinMaxObserver from ExecuTorch's stock
XNNPACKQuantizer, for instance) is wrapped in place by
``SearchableObserver``, which keeps the wrapped observer's statistics and qparams and adds
the scale override and the fake-quant switch. Weight observers get the wrapper too (for
fake-quant only), so the prepared model simulates the whole quantized model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e import DerivedObserverOrFakeQuantize
from torchao.quantization.pt2e.observer import ObserverBase

from esc_ao.observers import ActivationObserver, PerChannelWeightObserver, fake_quantize

__all__ = ["NoObserversError", "ScaleDim", "SearchableObserver", "find_scale_dims"]


class NoObserversError(ValueError):
    """The graph has no activation observer to search."""


class SearchableObserver(ObserverBase):
    """Wraps any torchao observer: its statistics and qparams, plus a settable scale and a
    fake-quant switch. ``convert_pt2e`` treats it like the observer it wraps."""

    def __init__(self, inner: ObserverBase, label: str) -> None:
        super().__init__(dtype=inner.dtype, is_dynamic=getattr(inner, "is_dynamic", False))
        self.inner = inner
        self.qscheme = inner.qscheme
        self.quant_min, self.quant_max = inner.quant_min, inner.quant_max
        if hasattr(inner, "ch_axis"):
            self.ch_axis = inner.ch_axis
        self.label = label
        self.observing = False
        self.fake_quant = False
        self._scale_override: float | None = None
        self._inner_qparams: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def storage_dtype(self) -> torch.dtype:
        """The integer type the quantizer stores into (int8, int16, or int32 for a bias)."""
        dtype = self.inner.dtype
        return dtype if isinstance(dtype, torch.dtype) and not dtype.is_floating_point else torch.int8

    @property
    def per_channel(self) -> bool:
        return self.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.inner(x)
            self._inner_qparams = None
        if not self.fake_quant:
            return x
        scale, zp = self.calculate_qparams()
        if self.per_channel:
            q = torch.ops.quantized_decomposed.quantize_per_channel(
                x, scale, zp, self.ch_axis, self.quant_min, self.quant_max, self.storage_dtype
            )
            return torch.ops.quantized_decomposed.dequantize_per_channel(
                q, scale, zp, self.ch_axis, self.quant_min, self.quant_max, self.storage_dtype
            )
        return fake_quantize(x, float(scale), int(zp), self.quant_min, self.quant_max)

    def _statistics_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        # HistogramObserver.calculate_qparams runs a search of its own (hundreds of ms):
        # compute it once per set of statistics, not once per candidate.
        if self._inner_qparams is None:
            self._inner_qparams = self.inner.calculate_qparams()
        return self._inner_qparams

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        scale, zp = self._statistics_qparams()
        if self._scale_override is not None:
            scale = torch.tensor([self._scale_override], dtype=torch.float32)
        return scale, zp

    @property
    def init_scale(self) -> float:
        return float(self._statistics_qparams()[0].reshape(-1)[0])

    @property
    def scale(self) -> float:
        return float(self.calculate_qparams()[0].reshape(-1)[0])

    def qparams(self) -> tuple[float, int]:
        scale, zp = self.calculate_qparams()
        return float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0])

    def set_scale(self, scale: float | None) -> None:
        if scale is not None and not (0.0 < scale < float("inf")):
            raise ValueError(f"scale={scale!r} for {self.label} must be finite and > 0")
        self._scale_override = None if scale is None else float(scale)


Searchable = ActivationObserver | SearchableObserver


@dataclass
class ScaleDim:
    """One search dimension: one activation observer, and so one scale, whichever tensors
    it watches (a shared observer, e.g. the residual stream's, is called at several nodes)."""

    name: str  # the observer's module name in the graph
    nodes: list[Node]  # its call_module nodes, in graph order
    observer: Searchable

    @property
    def label(self) -> str:
        return self.observer.label


def _is_weight(node: Node) -> bool:
    src = node.args[0] if node.args else None
    return isinstance(src, Node) and src.op == "get_attr"


def find_scale_dims(prepared: GraphModule) -> list[ScaleDim]:
    """Every per-tensor activation observer of a prepared graph, once, in the order of its
    first call; wraps foreign observers (and weight observers, for fake-quant) in place.

    Raises:
        NoObserversError: the model was not prepared, or was already converted.
    """
    dims: dict[int, ScaleDim] = {}  # by observer: a shared one is one dimension
    # One wrapper per foreign observer object: a SharedQuantizationSpec puts one object
    # under several names, and they must keep sharing one scale.
    wrappers: dict[int, SearchableObserver] = {}

    def wrap(node: Node, module: ObserverBase, label: str) -> SearchableObserver:
        if id(module) not in wrappers:
            wrappers[id(module)] = SearchableObserver(module, label)
        _replace(prepared, str(node.target), wrappers[id(module)])
        return wrappers[id(module)]

    dynamic = 0
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        module = prepared.get_submodule(node.target)
        if not isinstance(module, ObserverBase):
            continue
        if getattr(module, "is_dynamic", False):
            dynamic += 1
            continue
        if not hasattr(module, "calculate_qparams") or not hasattr(module, "quant_min"):
            continue  # derived (bias) observers and placeholders have no scale of their own
        label = getattr(module, "label", None) or f"{node.name} on {node.args[0]}"
        if _is_weight(node) or module.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine):
            if not isinstance(module, (PerChannelWeightObserver, SearchableObserver)):
                wrap(node, module, label)
            continue
        if isinstance(module, (ActivationObserver, SearchableObserver)):
            obs: Searchable = module
        else:
            obs = wrap(node, module, label)
        if id(obs) in dims:
            dims[id(obs)].nodes.append(node)
        else:
            dims[id(obs)] = ScaleDim(str(node.target), [node], obs)
    _repoint_derived(prepared, wrappers)
    if not dims and dynamic:
        raise NoObserversError(
            f"the graph's {dynamic} activation observer(s) are all dynamic (scales chosen at run time, e.g. "
            "XNNPACKQuantizer with is_dynamic=True): ESC has no static scale to search; convert_pt2e the graph as "
            "it is, or prepare it with static activations (is_dynamic=False) to calibrate them with ESC"
        )
    if not dims:
        raise NoObserversError(
            "no activation observers found: pass the model returned by prepare_pt2e, after the calibration "
            "batches have run and before convert_pt2e"
        )
    return list(dims.values())


def _repoint_derived(prepared: GraphModule, wrappers: dict[int, SearchableObserver]) -> None:
    """Derived observers (a bias's int32 scale = input scale x weight scale, e.g. in Arm's
    quantizer) hold the observers they derive from: point them at the wrappers, or a
    searched input scale would not reach the bias (measured: 1 LSB off on 18 % of a
    linear's outputs on the TOSA reference model)."""
    for module in prepared.modules():
        sources = getattr(module, "obs_or_fqs", None)
        if isinstance(module, DerivedObserverOrFakeQuantize) and sources is not None:
            for i, src in enumerate(sources):
                if id(src) in wrappers:
                    sources[i] = wrappers[id(src)]


def _replace(gm: GraphModule, name: str, module: Any) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    setattr(owner, attr, module)
