"""Graph rewrites run before annotation, so that speech-model graphs can be fully quantized.

* ``drop_noop_casts``: ``aten.to.dtype`` to the dtype a tensor already has (openai-whisper's
  Linear/Conv1d/LayerNorm cast their weights to the input dtype) and the
  ``_assert_tensor_metadata`` checks export puts before them. Left in, they would sit between
  a weight and its linear, hiding the weight from per-channel annotation.
* ``decompose_sdpa``: ``scaled_dot_product_attention`` becomes matmul -> scale -> (mask) ->
  softmax -> matmul, so both attention matmuls (scores and context) can be quantized.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch._guards import detect_fake_mode
from torch.fx import GraphModule, Node

__all__ = [
    "SKIP_KEY",
    "arg_node",
    "copy_debug_meta",
    "decompose_sdpa",
    "drop_noop_casts",
    "emit_like",
    "replace_parameter",
    "resolve_attr",
    "shared_weight",
    "tidy",
    "tied_linears",
]

# node.meta key: this node must stay float; the value says why (shown in the report).
SKIP_KEY = "esc_ao_keep_float"

aten = torch.ops.aten


def arg_node(node: Node, index: int) -> Node:
    """``node.args[index]``, which the caller has established is a node (fx types an
    argument as any of a dozen things)."""
    arg = node.args[index]
    if not isinstance(arg, Node):
        raise TypeError(f"{node.name}: argument {index} is {type(arg).__name__}, not a graph node")
    return arg


def emit_like(gm: GraphModule, like: Node, target: Callable[..., Any], *args: Any, fake_mode: Any = None) -> Node:
    """A call_function node of ``target`` at the graph's insertion point, with ``like``'s
    module metadata and, under ``fake_mode``, a fake value (what the quantizer's annotators
    and later rewrites read)."""
    new = gm.graph.call_function(target, args)
    copy_debug_meta(like, new)
    if fake_mode is not None:
        vals = [a.meta["val"] if isinstance(a, Node) else a for a in args]
        with fake_mode:
            new.meta["val"] = target(*vals)
    return new


def copy_debug_meta(src: Node, dst: Node) -> None:
    """Gives a node written by a rewrite the module path and source line of the node it
    replaces: overrides by module name, the report and error messages read them."""
    dst.meta.update({k: v for k, v in src.meta.items() if k in ("nn_module_stack", "stack_trace")})


def drop_noop_casts(gm: GraphModule) -> int:
    """Removes dtype casts that do not change the dtype; returns how many were removed."""
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
            continue
        if node.target in (aten.to.dtype, aten._to_copy.default) and _is_noop_cast(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed += 1
    gm.graph.lint()
    gm.recompile()
    return removed


def _is_noop_cast(node: Node) -> bool:
    src = node.args[0]
    if not isinstance(src, Node):
        return False
    val_in, val_out = src.meta.get("val"), node.meta.get("val")
    if not isinstance(val_in, torch.Tensor) or not isinstance(val_out, torch.Tensor):
        return False
    extra = {k: v for k, v in node.kwargs.items() if k not in ("dtype", "copy")}
    return (
        val_in.dtype == val_out.dtype
        and val_in.device == val_out.device
        and not any(v not in (None, False) for k, v in extra.items() if k != "memory_format")
    )


def decompose_sdpa(gm: GraphModule) -> int:
    """Rewrites every scaled_dot_product_attention node; returns how many were rewritten.

    Raises:
        NotImplementedError: for dropout_p > 0 (calibrate in eval mode) or enable_gqa.
    """
    count = 0
    fake_mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes])
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == aten.scaled_dot_product_attention.default:
            _rewrite_sdpa(gm, node, fake_mode)
            count += 1
    if count:
        tidy(gm)
    return count


def resolve_attr(module: torch.nn.Module, target: str) -> Any:
    """The object a ``get_attr`` node's dotted target names on ``module``."""
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def shared_weight(gm: GraphModule, node: Node) -> bool:
    """Whether the parameter a get_attr node reads is read elsewhere too (by another op,
    or under another name, as a tied embedding and output projection are)."""
    if len(node.users) > 1:
        return True
    weight = resolve_attr(gm, str(node.target))
    for other in gm.graph.nodes:
        if other.op == "get_attr" and other is not node:
            obj = resolve_attr(gm, str(other.target))
            if isinstance(obj, torch.Tensor) and obj.data_ptr() == weight.data_ptr():
                return True
    return False


def tied_linears(gm: GraphModule) -> list[str]:
    """Names of the linear nodes whose weight is a parameter also read elsewhere (a tied
    embedding). Drops no-op casts first: one between a weight and its linear would hide it."""
    drop_noop_casts(gm)
    return [
        node.name
        for node in gm.graph.nodes
        if node.op == "call_function"
        and node.target == aten.linear.default
        and isinstance(node.args[1], Node)
        and node.args[1].op == "get_attr"
        and shared_weight(gm, node.args[1])
    ]


def replace_parameter(gm: GraphModule, target: str, value: torch.Tensor) -> None:
    """Sets the graph's parameter ``target`` to a new tensor (never in place: the exported
    graph shares its parameters with the model it came from)."""
    owner, _, name = target.rpartition(".")
    module = resolve_attr(gm, owner) if owner else gm
    old = getattr(module, name)
    new = (
        torch.nn.Parameter(value.detach().clone(), requires_grad=False)
        if isinstance(old, torch.nn.Parameter)
        else value.detach().clone()
    )
    setattr(module, name, new)


def tidy(gm: GraphModule) -> None:
    """After a rewrite: drop the nodes it orphaned, check the graph, regenerate code."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def _sdpa_args(node: Node) -> dict[str, Any]:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults: dict[str, Any] = {
        "attn_mask": None,
        "dropout_p": 0.0,
        "is_causal": False,
        "scale": None,
        "enable_gqa": False,
    }
    args = dict(defaults)
    args.update(zip(names, node.args))
    args.update(node.kwargs)
    return args


def _rewrite_sdpa(gm: GraphModule, node: Node, fake_mode: Any) -> None:
    a = _sdpa_args(node)
    if a["dropout_p"] or a["enable_gqa"]:
        raise NotImplementedError(
            f"{node.name}: scaled_dot_product_attention with dropout_p={a['dropout_p']} / "
            f"enable_gqa={a['enable_gqa']} cannot be decomposed for quantization: export the "
            "model in eval mode without grouped-query attention"
        )
    q, k, v = a["query"], a["key"], a["value"]
    q_val, k_val = q.meta["val"], k.meta["val"]
    length, source = q_val.shape[-2], k_val.shape[-2]
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(q_val.shape[-1])
    g = gm.graph

    def emit(target: Callable[..., Any], *args: Any) -> Node:
        return emit_like(gm, node, target, *args, fake_mode=fake_mode)

    with g.inserting_before(node):
        scores = emit(aten.matmul.default, q, emit(aten.transpose.int, k, -2, -1))
        scores = emit(aten.mul.Tensor, scores, float(scale))
        if a["is_causal"]:
            scores = emit(aten.add.Tensor, scores, _causal_mask(gm, length, source, fake_mode, node))
            scores.meta[SKIP_KEY] = "adds the causal attention mask (-inf entries cannot be quantized)"
        mask = a["attn_mask"]
        if isinstance(mask, Node):
            if mask.meta["val"].dtype == torch.bool:
                scores = emit(aten.masked_fill.Scalar, scores, emit(aten.logical_not.default, mask), float("-inf"))
            else:
                scores = emit(aten.add.Tensor, scores, mask)
                scores.meta[SKIP_KEY] = "adds the attention mask (-inf entries cannot be quantized)"
        probs = emit(aten.softmax.int, scores, -1)
        out = emit(aten.matmul.default, probs, v)
    node.replace_all_uses_with(out)
    g.erase_node(node)


def _causal_mask(gm: GraphModule, length: int, source: int, fake_mode: Any, like: Node) -> Node:
    # SDPA's is_causal keeps the lower-left triangle (torch.ones(L, S).tril()).
    name = f"_esc_causal_mask_{length}x{source}"
    if not hasattr(gm, name):
        mask = torch.full((length, source), float("-inf")).triu(1)
        gm.register_buffer(name, mask)
    with gm.graph.inserting_before(like):
        node = gm.graph.get_attr(name)
    node.meta["val"] = fake_mode.from_tensor(getattr(gm, name))
    return node
