"""What a lowered ExecuTorch program runs where: integer kernels, float kernels inside
the XNNPACK delegate, and portable kernels outside it (with the partitioner's reason).

An op inside the delegate counts as an integer kernel when XNNPACK fuses it with the
quantize/dequantize nodes around it: every tensor input comes from a dequantize node and
every user is a quantize node and XNNPACK has a qs8 kernel for it (``_QS8``),
or it is a GEMM (linear/conv/mm) whose input and weight both come from dequantize nodes
and whose output is float: XNNPACK's dynamic-activation qd8 kernels (int8 x int8/int4),
or a bmm that esc_ao's partitioner delegates as XNNPACK's int8 batch matmul
(esc_ao.lower.partition.int8_bmm).
Quantize/dequantize nodes themselves are conversions; views and permutes move data.
"""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.fx import GraphModule, Node

from esc_ao.lower.partition import int8_bmm

__all__ = ["Coverage", "collect_reasons", "op_coverage"]

_QUANT = ("quantize_per_tensor", "quantize_per_channel", "quantize_affine", "choose_qparams")
_DEQUANT = ("dequantize_per_tensor", "dequantize_per_channel", "dequantize_affine")
_MOVES = (
    "view",
    "permute",
    "transpose",
    "unsqueeze",
    "squeeze",
    "slice",
    "select",
    "expand",
    "clone",
    "cat",
    "_to_dim_order_copy",
    "_clone_dim_order",
    "constant_pad_nd",
)
_GEMMS = ("linear", "convolution", "mm", "addmm")
# Ops XNNPACK has static int8 (qs8) kernels for; any other op between a dequantize and a
# quantize (GELU, softmax, sigmoid, ...) runs in float between two conversions.
_QS8 = _GEMMS + (
    "add.Tensor",
    "sub.Tensor",
    "mul.Tensor",
    "mean.dim",
    "hardtanh",
    "relu",
    "clamp",
    "max_pool2d",
    "avg_pool2d",
    "cat",
)
_LOGGER_PREFIX = "executorch.backends.xnnpack.partition"


@dataclass
class Coverage:
    """Op counts by where they run; ``portable`` maps op name -> reasons."""

    integer: Counter = field(default_factory=Counter)
    float_delegated: Counter = field(default_factory=Counter)
    conversions: Counter = field(default_factory=Counter)
    data_movement: Counter = field(default_factory=Counter)
    portable: dict[str, Counter] = field(default_factory=dict)
    delegate_calls: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "delegate_calls": self.delegate_calls,
            "integer_kernels": dict(self.integer),
            "float_kernels_in_delegate": dict(self.float_delegated),
            "quantize_dequantize": dict(self.conversions),
            "data_movement": dict(self.data_movement),
            "portable_kernels": {op: dict(reasons) for op, reasons in self.portable.items()},
        }

    def summary(self) -> str:
        n_int, n_flt = sum(self.integer.values()), sum(self.float_delegated.values())
        n_port = sum(sum(r.values()) for r in self.portable.values())
        return (
            f"{self.delegate_calls} XNNPACK delegate call(s); compute ops: {n_int} integer, "
            f"{n_flt} float in XNNPACK, {n_port} portable; "
            f"{sum(self.conversions.values())} quantize/dequantize"
        )


def _name(node: Node) -> str:
    name = getattr(node.target, "__name__", str(node.target))
    for prefix in ("aten.", "quantized_decomposed.", "torchao."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name.removesuffix(".default")


def _is(node: object, names: tuple[str, ...]) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and any(n in _name(node) for n in names)


def _classify_delegated(gm: GraphModule, cov: Coverage) -> None:
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = _name(node)
        if _is(node, _QUANT + _DEQUANT):
            cov.conversions[name] += 1
        elif any(m in name for m in _MOVES):
            cov.data_movement[name] += 1
        else:
            tensors = [a for a in node.all_input_nodes if a.op == "call_function" or a.op == "placeholder"]
            acts = [a for a in tensors if a.op == "call_function"]
            from_dq = bool(acts) and all(_is(a, _DEQUANT) for a in acts)
            static = from_dq and name in _QS8 and bool(node.users) and all(_is(u, _QUANT) for u in node.users)
            static = static or (name == "bmm" and int8_bmm(node))
            dynamic = from_dq and name in _GEMMS and len(acts) >= 2
            (cov.integer if static or dynamic else cov.float_delegated)[name] += 1


def op_coverage(program: torch.export.ExportedProgram, reasons: dict[str, str] | None = None) -> Coverage:
    """Counts of a lowered edge program's ops by where they run."""
    cov = Coverage()
    reasons = reasons or {}
    gm = program.graph_module
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target.__class__.__name__ == "builtin_function_or_method":
            continue
        if "executorch_call_delegate" in str(node.target):
            cov.delegate_calls += 1
            lowered = getattr(gm, node.args[0].target)
            _classify_delegated(lowered.original_module.graph_module, cov)
            continue
        name = _name(node)
        why = reasons.get(node.name, "XNNPACK has no partitioner config for this op")
        cov.portable.setdefault(name, Counter())[why] += 1
    return cov


class _ReasonHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.reasons: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        why = record.msg
        node = getattr(why, "node", None)
        if node is not None and node.name not in self.reasons:
            self.reasons[node.name] = str(getattr(why, "reason", why))


@contextmanager
def collect_reasons() -> Iterator[dict[str, str]]:
    """Captures the XNNPACK partitioner's "why not partitioned" messages by node name."""
    handler = _ReasonHandler()
    loggers = [logging.getLogger(name) for name in logging.root.manager.loggerDict if name.startswith(_LOGGER_PREFIX)]
    saved = [(lg, lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        # DEBUG is where the partitioner says why; kept from the root handlers.
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
        lg.propagate = False
    try:
        yield handler.reasons
    finally:
        for lg, level, propagate in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate
