"""Graph rewrites that let XNNPACK run a whole speech model in one delegate.

ExecuTorch 1.5's XNNPACK partitioner has no LayerNorm; every ``layer_norm`` runs as a
portable kernel outside the delegate and cuts it in two. A 16-layer Conformer has 80
of them, so its float ``.pte`` was 146 separate delegate calls with layout conversions
between them. ``decompose_layer_norm`` writes LayerNorm with ops XNNPACK has (mean over
the two innermost dims of a 4-D view, sub, mul, add, rsqrt), so the delegate is not cut.
It works on float graphs and on converted (quantize/dequantize) graphs alike: in the
latter a LayerNorm sits between a dequantize and a quantize node and the decomposed ops
compute in float between them, exactly as the single op did.

``matmul_to_bmm``: a 4-D attention ``matmul`` (B, H, T, d) decomposes, in ExecuTorch's
edge dialect, into expand + view + bmm; XNNPACK has no expand, so every attention cut
the delegate (Whisper's encoder). Written as reshape -> bmm -> reshape up front, the
expand (a no-op for equal batch shapes) never appears.

``requantize_bmm_views``: an attention matmul quantized on both sides (inputs int8, output
int8: EscQuantizer's ``attention="int8"`` on the XNNPACK target) reaches its dequantize and
quantize nodes through views and transposes (reshape -> bmm -> reshape above, the heads'
permutes). XNNPACK's static int8 batch matmul is only taken when the bmm reads dequantize
nodes and writes a quantize node directly (esc_ao.lower.partition.Int8BmmConfig), so a
quantize -> dequantize pair with the dequantize's own parameters goes after every such
view: q(dq(x)) with equal parameters is x on the integer grid, so no value changes, and
the views then move int8 data.

``store_conv_int4_as_int8``: XNNPACK packs a per-channel weight declared [-8, 7] as int4
(qc4w), which it supports for linear weights only (2-D); a conv's 4-D weight fails the
packing. Declaring conv weights' range as [-127, 127] keeps the same integer values
(they lie in [-8, 7]) stored as int8: the same arithmetic, int8 storage for convs.

``clamp_narrow_grids``: XNNPACK quantizes every int8 tensor to the full [-128, 127]
range and ignores a quantize node's narrower [-8, 7]: a W4A4 program then computed a
different (less clipped) model than the one calibrated (measured: 8.8 dB between the two
on a small Conformer). A ``hardtanh`` to the grid's real range before each narrow
quantize restores the 4-bit clipping; after a linear or conv XNNPACK fuses it into the
integer kernel's output clamp, elsewhere it runs as a float clamp in the delegate.
"""

from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

from esc_ao.graph_prep import copy_debug_meta, tidy

__all__ = [
    "decompose_layer_norm",
    "matmul_to_bmm",
    "prepare_for_xnnpack",
    "requantize_bmm_views",
    "store_conv_int4_as_int8",
]

aten = torch.ops.aten


def decompose_layer_norm(gm: GraphModule) -> int:
    """Rewrites every ``aten.layer_norm`` over the last dimension; returns the count.

    A LayerNorm over several trailing dimensions is left alone (none of the speech
    models here has one); it then runs outside the delegate, as before.
    """
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == aten.layer_norm.default:
            if _rewrite(gm, node):
                count += 1
    if count:
        tidy(gm)
    return count


def prepare_for_xnnpack(gm: GraphModule) -> dict[str, int]:
    """All rewrites of this module; returns how many nodes each rewrote."""
    return {
        "layer_norm": decompose_layer_norm(gm),
        "matmul": matmul_to_bmm(gm),
        "bmm_requantized_views": requantize_bmm_views(gm),
        "conv_int4_weights": store_conv_int4_as_int8(gm),
        "narrow_grids": clamp_narrow_grids(gm),
    }


def clamp_narrow_grids(gm: GraphModule) -> int:
    """Inserts hardtanh(lo, hi) before each quantize node narrower than int8 (see doc)."""
    q = torch.ops.quantized_decomposed.quantize_per_tensor.default
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != q:
            continue
        x, scale, zp, qmin, qmax, dtype = node.args[:6]
        if dtype != torch.int8 or (qmin, qmax) == (-128, 127) or not isinstance(scale, float):
            continue
        with gm.graph.inserting_before(node):
            clamp = gm.graph.call_function(aten.hardtanh.default, (x, (qmin - zp) * scale, (qmax - zp) * scale))
        copy_debug_meta(node, clamp)
        node.replace_input_with(x, clamp)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def store_conv_int4_as_int8(gm: GraphModule) -> int:
    """Widens the declared range of 4-bit conv weights to int8's (values unchanged)."""
    dq = torch.ops.quantized_decomposed.dequantize_per_channel.default
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (aten.conv1d.default, aten.conv2d.default):
            continue
        w = node.args[1]
        if isinstance(w, Node) and w.target == dq and tuple(w.args[4:6]) == (-8, 7):
            w.args = w.args[:4] + (-127, 127) + w.args[6:]
            count += 1
    if count:
        gm.recompile()
    return count


def _shape(node: object) -> list[int] | None:
    # convert_pt2e's quantize/dequantize nodes carry no "val": look through them.
    for _ in range(4):
        if not isinstance(node, Node):
            return None
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return list(val.shape)
        node = node.args[0] if node.args else None
    return None


def matmul_to_bmm(gm: GraphModule) -> int:
    """Rewrites N-D (N >= 3) matmuls whose operands have equal batch shapes."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != aten.matmul.default:
            continue
        a, b = node.args[0], node.args[1]
        sa, sb = _shape(a), _shape(b)
        if sa is None or sb is None or len(sa) < 3 or sa[:-2] != sb[:-2]:
            continue
        if any(not isinstance(d, int) for d in sa + sb):
            continue
        batch, (m, k), n = sa[:-2], sa[-2:], sb[-1]
        flat = math.prod(batch)
        g = gm.graph
        with g.inserting_before(node):
            a3 = g.call_function(aten.reshape.default, (a, [flat, m, k]))
            b3 = g.call_function(aten.reshape.default, (b, [flat, k, n]))
            y = g.call_function(aten.reshape.default, (g.call_function(aten.bmm.default, (a3, b3)), batch + [m, n]))
        for new in _between(a3.prev, y):
            copy_debug_meta(node, new)
        node.replace_all_uses_with(y)
        g.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _rewrite(gm: GraphModule, node: Node) -> bool:
    args = list(node.args) + [None] * (5 - len(node.args))
    x, shape, weight, bias, eps = args[:5]
    eps = node.kwargs.get("eps", eps if eps is not None else 1e-5)
    if not isinstance(x, Node) or not isinstance(shape, (list, tuple)) or len(shape) != 1:
        return False
    if not isinstance(eps, (int, float)):
        return False
    width = int(shape[0])  # type: ignore[arg-type]  # a normalized_shape entry is an int
    # The output has the input's shape; convert_pt2e's new dequantize nodes carry no
    # "val", so read the shape off whichever of the two has it.
    val = node.meta.get("val", x.meta.get("val"))
    out_shape = list(val.shape) if isinstance(val, torch.Tensor) else None
    if out_shape is None or any(not isinstance(s, int) for s in out_shape):
        return False  # a symbolic shape cannot be folded into the 4-D view
    rows = math.prod(out_shape[:-1])
    g = gm.graph
    with g.inserting_before(node):
        # XNNPACK's mean is a global average pool: 4-D input, dims (2, 3), keepdim.
        x4 = g.call_function(aten.view.default, (x, [rows, 1, width, 1]))
        mean = g.call_function(aten.mean.dim, (x4, [2, 3], True))
        centred = g.call_function(aten.sub.Tensor, (x4, mean))
        var = g.call_function(aten.mean.dim, (g.call_function(aten.mul.Tensor, (centred, centred)), [2, 3], True))
        inv = g.call_function(aten.rsqrt.default, (g.call_function(aten.add.Tensor, (var, float(eps))),))
        y = g.call_function(aten.view.default, (g.call_function(aten.mul.Tensor, (centred, inv)), out_shape))
        if isinstance(weight, Node):
            y = g.call_function(aten.mul.Tensor, (y, weight))
        if isinstance(bias, Node):
            y = g.call_function(aten.add.Tensor, (y, bias))
    for new in _between(x, y):
        copy_debug_meta(node, new)
    node.replace_all_uses_with(y)
    g.erase_node(node)
    return True


def _between(start: Node, end: Node) -> list[Node]:
    out, cur = [], end
    while cur is not start and cur is not None:
        out.append(cur)
        cur = cur.prev
    return out


_Q = torch.ops.quantized_decomposed.quantize_per_tensor.default
_DQ = torch.ops.quantized_decomposed.dequantize_per_tensor.default
_VIEWS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.transpose.int,
    aten.permute.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.squeeze.dim,
    aten.unsqueeze.default,
}


def _is_view(node: object) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in _VIEWS


def _views_up(x: object) -> tuple[list[Node], Node | None]:
    """The views between an input and the dequantize it comes from (nearest the bmm
    first), and that dequantize (None when the chain ends elsewhere)."""
    chain: list[Node] = []
    while _is_view(x):
        assert isinstance(x, Node)
        chain.append(x)
        x = x.args[0]
    return chain, x if isinstance(x, Node) and x.target == _DQ else None


def _views_down(bmm: Node) -> tuple[list[Node], Node | None]:
    """The single-user views from a bmm to the quantize it ends in, and that quantize."""
    chain: list[Node] = []
    cur = bmm
    while len(cur.users) == 1:
        user = next(iter(cur.users))
        if _is_view(user):
            chain.append(user)
            cur = user
            continue
        return chain, user if user.target == _Q else None
    return chain, None


def _requantize_after(gm: GraphModule, node: Node, params: tuple, user: Node) -> None:
    g = gm.graph
    with g.inserting_after(node):
        q = g.call_function(_Q, (node, *params))
    with g.inserting_after(q):
        dq = g.call_function(_DQ, (q, *params))
    user.replace_input_with(node, dq)


def requantize_bmm_views(gm: GraphModule) -> int:
    """Makes every bmm that is quantized on both sides read dequantize nodes and write a
    quantize node directly; returns the number of quantize/dequantize pairs inserted."""
    inserted = 0
    for bmm in [n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.bmm.default]:
        ups = [_views_up(a) for a in bmm.args[:2]]
        down, q = _views_down(bmm)
        if q is None or any(dq is None for _, dq in ups):
            continue  # not an integer matmul: left to XNNPACK's float bmm
        for chain, dq in ups:
            assert dq is not None
            for i, view in enumerate(chain):
                _requantize_after(gm, view, tuple(dq.args[1:]), chain[i - 1] if i else bmm)
                inserted += 1
        params = tuple(q.args[1:])
        for node, user in zip([bmm, *down], down):  # every node before the last view
            _requantize_after(gm, node, params, user)
            inserted += 1
    if inserted:
        gm.graph.lint()
        gm.recompile()
    return inserted
