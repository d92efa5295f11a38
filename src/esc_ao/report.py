"""Per-layer report: activation ranges, per-layer and output SQNR against float, size.

SQNR is measured on the prepared model itself: observers switched to fake-quant make it
the quantized model, switched off make it the float model, so both runs share one graph
and node names line up exactly (no matching of float and converted graphs needed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch.fx import GraphModule, Interpreter, Node

from esc_ao.graph_prep import resolve_attr
from esc_ao.observers import ActivationObserver, PerChannelWeightObserver, iter_observers, observer_mode
from esc_ao.pipeline import Batch
from esc_ao.search.objectives import output_tensors

__all__ = [
    "ObserverStats",
    "layer_sqnr",
    "observer_stats",
    "output_sqnr",
    "sqnr_db",
    "tensor_sqnr_db",
    "weight_bytes",
]


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """10 log10(signal / noise); +inf for an exact match."""
    if noise_power <= 0.0:
        return math.inf
    if signal_power <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


def tensor_sqnr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - other|^2) (esc_ao.report.sqnr_db of the two powers); +inf
    when identical."""
    signal = reference.double().pow(2).sum().item()
    return sqnr_db(signal, (reference.double() - other.double()).pow(2).sum().item())


class _Capture(Interpreter):
    def __init__(self, gm: GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names = names
        self.outputs: dict[str, torch.Tensor] = {}

    def run_node(self, n: Node) -> Any:
        result = super().run_node(n)
        if n.name in self.names and isinstance(result, torch.Tensor):
            self.outputs[n.name] = result.detach()
        return result


@torch.no_grad()
def layer_sqnr(prepared: GraphModule, batches: Iterable[Batch], nodes: list[str]) -> dict[str, float]:
    """SQNR (dB) of each named node's output, quantized vs float, pooled over batches."""
    power: dict[str, list[float]] = {n: [0.0, 0.0] for n in nodes}
    for batch in batches:
        runs = []
        for fq in (False, True):
            with observer_mode(prepared, observing=False, fake_quant=fq):
                cap = _Capture(prepared, set(nodes))
                cap.run(*batch)
                runs.append(cap.outputs)
        ref, quant = runs
        for name in nodes:
            if name in ref:
                r = ref[name].float()
                power[name][0] += float(r.pow(2).sum())
                power[name][1] += float((r - quant[name].float()).pow(2).sum())
    return {n: sqnr_db(s, e) for n, (s, e) in power.items()}


@torch.no_grad()
def output_sqnr(reference: torch.nn.Module, quantized: torch.nn.Module, batches: Iterable[Batch]) -> float:
    """SQNR (dB) of all model outputs, pooled over batches."""
    signal = noise = 0.0
    for batch in batches:
        for r, q in zip(output_tensors(reference(*batch)), output_tensors(quantized(*batch))):
            signal += float(r.float().pow(2).sum())
            noise += float((r.float() - q.float()).pow(2).sum())
    return sqnr_db(signal, noise)


@dataclass(frozen=True)
class ObserverStats:
    """What one activation observer saw and chose."""

    label: str
    method: str
    min: float
    max: float
    threshold: float
    scale: float
    zero_point: int
    clip_ratio: float  # threshold / max|x|: 1 means no clipping

    @classmethod
    def of(cls, obs: ActivationObserver) -> "ObserverStats":
        scale, zp = obs.qparams()
        amax = obs.amax
        lo, hi = obs.clip_range()
        threshold = max(-lo, hi)
        return cls(
            obs.label,
            obs.method,
            float(obs.min_val),
            float(obs.max_val),
            threshold,
            scale,
            zp,
            threshold / amax if amax > 0 else 1.0,
        )


def observer_stats(prepared: torch.nn.Module) -> list[ObserverStats]:
    """Stats of every activation observer, in graph order."""
    return [ObserverStats.of(o) for _, o in iter_observers(prepared) if isinstance(o, ActivationObserver)]


def weight_bytes(prepared: GraphModule) -> dict[str, int]:
    """Bytes of the quantized weights, each at its own observer's width (4 or 8 bits: a
    precision plan or a tied projection may mix them), plus one float32 scale per channel,
    against the same weights in float32."""
    n_weights = n_channels = n_bits = 0
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        obs = prepared.get_submodule(node.target)
        src = node.args[0]
        if not (isinstance(src, Node) and src.op == "get_attr"):
            continue
        if isinstance(obs, PerChannelWeightObserver):
            numel = resolve_attr(prepared, str(src.target)).numel()
            n_weights += numel
            n_bits += numel * (4 if obs.quant_max <= 7 else 8)
            n_channels += obs.absmax.numel()
        elif getattr(obs, "qscheme", None) in (torch.per_channel_symmetric, torch.per_channel_affine):
            # another quantizer's per-channel observer (wrapped by the search or not): int4,
            # int8, or an int32 bias
            weight = resolve_attr(prepared, str(src.target))
            n_weights += weight.numel()
            qmax = int(getattr(obs, "quant_max"))
            n_bits += weight.numel() * (4 if qmax <= 7 else 8 if qmax <= 127 else 32)
            n_channels += weight.shape[getattr(obs, "ch_axis", 0)] if weight.dim() else 1
    return {"float32_bytes": 4 * n_weights, "quantized_bytes": (n_bits + 7) // 8 + 4 * n_channels}
