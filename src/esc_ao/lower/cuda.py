"""CUDA lowering: the reference quantized linears of a converted graph become int8 GEMMs.

TensorRT does not take PT2E quantize/dequantize graphs (TensorRT issue 3471), so the CUDA
path is our own. ``lower_int8_linears`` finds

    x_q = quantize_per_tensor(x)      (int8, scale s_x, zero point z_x)
    w_q = int8 constant               (per-output-channel scales s_w, zero points 0)
    y   = linear(dequantize(x_q), dequantize_per_channel(w_q), bias)

and replaces the linear by ``int8_linear(x_q, w_q, ...)``: an int8 x int8 -> int32
``torch._int_mm`` with the zero-point correction and the rescaling (and the bias) applied
to the int32 accumulator, which ``torch.compile`` fuses into one epilogue, together
with the next quantize node when there is one. The arithmetic is the integer one the
reference graph simulates: results agree with it to float rounding (tested on CPU, where
``torch._int_mm`` also runs). ``_int_mm`` on CUDA wants M > 16 and K, N multiples of 8;
linears outside those shapes are left as they are (the count is returned). A linear
whose input is quantized at run time (the XNNPACK target's dynamic int8 GEMMs: graph
outputs, writers of a float residual stream) is lowered the same way, with the scale and
zero point its ``choose_qparams`` computes.

Attention matmuls (dequantize -> matmul with two activation operands) stay on the
reference path: there is no batched int8 GEMM in torch, and their cost is small beside
the projections at speech sequence lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from esc_ao.graph_prep import resolve_attr, tidy

__all__ = [
    "CudaLowering",
    "compile_for_cuda",
    "int8_dequantize",
    "int8_dynamic_qparams",
    "int8_linear",
    "int8_quantize",
    "lower_int8_linears",
]

qd = torch.ops.quantized_decomposed
aten = torch.ops.aten


def int8_linear(
    x_q: torch.Tensor,
    x_scale: float | torch.Tensor,
    x_zero_point: int | torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """float(linear(dequant(x_q), dequant(w_q), bias)) computed as an int8 GEMM. The input's
    scale and zero point are constants (static) or 0-d tensors computed at run time
    (a dynamically quantized input)."""
    lead = x_q.shape[:-1]
    acc = torch._int_mm(x_q.reshape(-1, x_q.shape[-1]), w_q.t())
    if isinstance(x_zero_point, torch.Tensor):
        x_zero_point = x_zero_point.to(torch.int32)  # choose_qparams gives int64
    if isinstance(x_scale, torch.Tensor):
        # choose_qparams gives a float64 scale, which would promote the output (and every
        # float op after it) to float64.
        x_scale = x_scale.to(torch.float32)
    if isinstance(x_zero_point, torch.Tensor) or x_zero_point != 0:
        # (q_x - z_x) . w = q_x . w - z_x * sum_k w: the correction is per output column.
        acc = acc - x_zero_point * w_q.sum(dim=1, dtype=torch.int32)
    y = acc.to(torch.float32) * (w_scale.to(torch.float32) * x_scale)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, w_q.shape[0])


def int8_dynamic_qparams(x: torch.Tensor, qmin: int, qmax: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``choose_qparams.tensor``'s affine per-tensor scale and zero point, computed on
    ``x``'s device without a host sync: the decomposed op builds its ``eps`` on the CPU,
    which torch.compile rejects next to a CUDA input, and reads the scale back with
    ``.item()``. Scale float32, zero point int32, both 0-d."""
    lo, hi = torch.aminmax(x.float())
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = ((hi - lo) / float(qmax - qmin)).clamp(min=eps)
    zero_point = (qmin - torch.round(lo / scale).to(torch.int32)).clamp(qmin, qmax)
    return scale, zero_point


def int8_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``quantize_per_tensor.tensor`` with run-time qparams, as device code (the decomposed
    op reads them back to the host)."""
    q = torch.round(x.float() * (1.0 / scale)) + zero_point
    return q.clamp(qmin, qmax).to(torch.int8)


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``dequantize_per_tensor.tensor`` as device code (for dynamic inputs whose reader
    stays on the reference path)."""
    return (q.to(torch.float32) - zero_point) * scale


@dataclass(frozen=True)
class CudaLowering:
    """What ``lower_int8_linears`` did: how many linears became int8 GEMMs, and why the
    others did not."""

    replaced: int
    skipped: dict[str, str]


def _is(node: object, op: object) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target == op


def _constant(gm: GraphModule, node: object) -> torch.Tensor | None:
    if isinstance(node, Node) and node.op == "get_attr":
        value = resolve_attr(gm, str(node.target))
        return value if isinstance(value, torch.Tensor) else None
    return None


def _match(gm: GraphModule, linear: Node) -> tuple[tuple, str | None]:
    x_dq, w_dq = linear.args[0], linear.args[1]
    bias = linear.args[2] if len(linear.args) > 2 else None
    static = _is(x_dq, qd.dequantize_per_tensor.default)
    if not isinstance(x_dq, Node) or not (static or _is(x_dq, qd.dequantize_per_tensor.tensor)):
        return (), "input is not a per-tensor dequantize"
    if not isinstance(w_dq, Node) or not _is(w_dq, qd.dequantize_per_channel.default):
        return (), "weight is not a per-channel dequantize"
    x_q, x_scale, x_zp = x_dq.args[0], x_dq.args[1], x_dq.args[2]
    # static: constant qparams; dynamic (.tensor): qparams computed from the input at run time
    qparams = (float, int) if static else (Node, Node)
    if x_dq.args[5] != torch.int8 or not isinstance(x_scale, qparams[0]) or not isinstance(x_zp, qparams[1]):
        return (), "activation is not int8 with per-tensor qparams"
    w = _constant(gm, w_dq.args[0])
    zps = _constant(gm, w_dq.args[2])
    if w is None or w.dtype != torch.int8 or w_dq.args[3] != 0 or (zps is not None and bool(zps.any())):
        return (), "weight is not a symmetric int8 constant quantized along dim 0"
    n, k = w.shape
    rows = 1
    val = linear.meta.get("val")
    if isinstance(val, torch.Tensor):
        rows = val.numel() // n
    if k % 8 or n % 8 or rows <= 16:
        return (), f"torch._int_mm needs M > 16 and K, N multiples of 8 (M={rows}, K={k}, N={n})"
    return (x_q, x_scale, x_zp, w_dq.args[0], w_dq.args[1], bias), None


def _device_dynamic_quantization(gm: GraphModule) -> None:
    """Run-time int8 quantization (the XNNPACK target's dynamic inputs) as device code."""
    for node in gm.graph.nodes:
        if _is(node, qd.choose_qparams.tensor) and node.args[4] == torch.int8:
            node.target = int8_dynamic_qparams
            node.args = node.args[:4]
        elif _is(node, qd.quantize_per_tensor.tensor) and node.args[5] == torch.int8:
            node.target = int8_quantize
            node.args = node.args[:5]
        elif _is(node, qd.dequantize_per_tensor.tensor) and node.args[5] == torch.int8:
            node.target = int8_dequantize
            node.args = node.args[:3]


def lower_int8_linears(gm: GraphModule) -> CudaLowering:
    """Rewrites the quantized linears of a converted graph in place (see module doc)."""
    replaced, skipped = 0, {}
    for node in list(gm.graph.nodes):
        if not _is(node, aten.linear.default):
            continue
        args, why = _match(gm, node)
        if why is not None:
            skipped[node.name] = why
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(int8_linear, args)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        replaced += 1
    _device_dynamic_quantization(gm)
    tidy(gm)
    return CudaLowering(replaced, skipped)


def compile_for_cuda(
    gm: GraphModule, device: str = "cuda", mode: str = "max-autotune-no-cudagraphs"
) -> tuple[torch.nn.Module, CudaLowering]:
    """Moves the converted graph to ``device``, lowers its linears and compiles it with
    ``torch.compile``'s ``mode`` (the default autotunes the GEMMs and their epilogues;
    ``"default"`` compiles in seconds, with cuBLAS GEMMs)."""
    report = lower_int8_linears(gm)
    gm = gm.to(device)
    # convert_pt2e stores folded int8 weights as plain attributes, which .to() skips.
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            owner, _, name = str(node.target).rpartition(".")
            module = gm.get_submodule(owner) if owner else gm
            value = getattr(module, name)
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                setattr(module, name, value.to(device))
    compiled: torch.nn.Module = torch.compile(gm, mode=mode, dynamic=False)  # type: ignore[assignment]
    return compiled, report
