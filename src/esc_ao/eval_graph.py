"""A converted reference graph made fast to evaluate on CPU, with the same numbers.

``convert_pt2e`` leaves (a) every weight as an integer constant dequantized again on every
call and (b) every activation as a chain quantize_per_tensor -> dequantize_per_tensor (eight
elementwise passes and two dtype copies). Measured on Whisper tiny.en W8A8 (one core): one
decoder step spent 72 % of its 0.57 s dequantizing weights (the 20M-entry token embedding
is the output projection too), and the encoder 2.5 s against 0.6 s in float.

``for_evaluation`` rewrites the graph so that

- a dequantize whose input is a constant becomes a constant: the same op, run once;
- a quantize_per_tensor feeding dequantize_per_tensor with the same parameters becomes one
  ``esc_ao.observers.fake_quantize`` (the same arithmetic, op for op, on one buffer).

Both give the converted graph's outputs bit for bit (tested). The result is for measuring
accuracy only: lowering needs the integer weights and the q/dq pairs, so it keeps using
the graph ``convert`` returns.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from esc_ao.observers import fake_quantize

__all__ = ["for_evaluation"]

_QD = torch.ops.quantized_decomposed
_DEQUANTIZE = (
    _QD.dequantize_per_tensor.default,
    _QD.dequantize_per_channel.default,
    _QD.dequantize_per_channel_group.default,
)


def for_evaluation(converted: GraphModule) -> GraphModule:
    """Rewrites ``converted`` in place (see the module doc) and returns it."""
    graph = converted.graph
    folded = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _DEQUANTIZE and _is_constant(node.args[0]):
            folded += 1
            _fold_constant(converted, node, f"_esc_eval_const_{folded}")
        elif node.target == _QD.dequantize_per_tensor.default and _is_pair(node):
            q = node.args[0]
            x, scale, zero_point, qmin, qmax = q.args[:5]
            with graph.inserting_before(node):
                fq = graph.call_function(fake_quantize, (x, scale, zero_point, qmin, qmax))
            fq.meta = dict(node.meta)
            node.replace_all_uses_with(fq)
            graph.erase_node(node)
    graph.eliminate_dead_code()
    graph.lint()
    converted.recompile()
    return converted


def _is_constant(node: object) -> bool:
    return isinstance(node, Node) and node.op == "get_attr"


def _is_pair(dq: Node) -> bool:
    """dequantize_per_tensor(quantize_per_tensor(x, p...), p...) with identical scalar p."""
    q = dq.args[0]
    return (
        isinstance(q, Node)
        and q.op == "call_function"
        and q.target == _QD.quantize_per_tensor.default
        and tuple(q.args[1:6]) == tuple(dq.args[1:6])
        and not dq.kwargs.get("out_dtype")
    )


def _fold_constant(gm: GraphModule, node: Node, name: str) -> None:
    args = [_fetch(gm, a) for a in node.args]
    kwargs = {k: _fetch(gm, v) for k, v in node.kwargs.items()}
    assert callable(node.target)  # a call_function node
    with torch.no_grad():
        value = node.target(*args, **kwargs)
    gm.register_buffer(name, value)
    with gm.graph.inserting_before(node):
        const = gm.graph.get_attr(name)
    const.meta = dict(node.meta)
    node.replace_all_uses_with(const)
    gm.graph.erase_node(node)


def _fetch(gm: GraphModule, arg: object) -> object:
    if isinstance(arg, Node):
        if arg.op != "get_attr":
            raise ValueError(f"cannot fold {arg.name}: it is computed, not a constant")
        obj: object = gm
        for part in str(arg.target).split("."):
            obj = getattr(obj, part)
        return obj
    return arg
