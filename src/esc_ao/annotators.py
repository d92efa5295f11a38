"""Which ATen ops are quantized, and how: an explicit table op -> role.

Roles:
* ``weighted``: linear / conv1d / conv2d (grouped and depthwise included). Input 0 is a
  per-tensor activation, input 1 a per-output-channel weight; the bias stays float.
* ``binary``: attention matmuls (scores and context), residual add, mul, sub: every
  tensor operand is a per-tensor activation (a scalar operand, as in scores * 1/sqrt(d),
  folds into the requantization scale and is not quantized).
* ``norm``: layer_norm: input and output quantized; its affine parameters stay float.
* ``passthrough``: view / permute / transpose / ...: they move values without changing
  them, so their output shares the input's quantization parameters. They are annotated
  only where a quantized op consumes them, so no useless quantize/dequantize pair appears.

Ops not in the table (GELU, SiLU, GLU, softmax, ...) compute in float; their outputs are
quantized wherever they feed a quantized op, because that op's input is annotated.

Two targets (``TARGETS``):
* ``reference``: the paper's full integer model. Every input of the ops above is on an
  integer grid, attention matmuls included; outputs are quantized only where a quantized
  op reads them.
* ``xnnpack``: what ExecuTorch's XNNPACK delegate runs as integer kernels. A static int8
  XNNPACK operator reads int8 and writes int8 (dequantize -> op -> quantize), so linear,
  conv, add, sub and mul get their outputs quantized too. XNNPACK runs bmm and softmax
  in float only, so the attention matmuls are left float (quantizing their inputs would
  add error and two conversions each, for no integer kernel), and LayerNorm, which runs
  as float ops, gets only its output quantized (its input is already the int8 output of
  a residual add). ``INT8_BMM_POLICY`` (EscQuantizer's ``attention``) instead gives
  the attention matmuls int8 inputs and outputs, which XNNPACK's own static int8 batch
  matmul runs when esc_ao.lower's partitioner delegates it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

import torch
from torch.fx import Node
from torch.utils._pytree import tree_leaves
from torchao.quantization.pt2e.quantizer import (
    QuantizationAnnotation,
    QuantizationSpec,
    SharedQuantizationSpec,
)

__all__ = [
    "ANNOTATION_KEY",
    "ATTENTION_MATMULS",
    "AttentionMatmuls",
    "INT8_BMM_POLICY",
    "OP_ROLES",
    "POLICY",
    "Policy",
    "RESIDUAL_PRECISIONS",
    "TARGETS",
    "ResidualPrecision",
    "Role",
    "Specs",
    "Target",
    "annotate_node",
    "float_tensor_inputs",
    "graph_outputs",
    "residual_adds",
]

aten = torch.ops.aten
ANNOTATION_KEY = "quantization_annotation"

Role = Literal["weighted", "binary", "matmul", "norm", "passthrough"]
Target = Literal["reference", "xnnpack"]
TARGETS: tuple[str, ...] = ("reference", "xnnpack")
# How the residual stream (see residual_adds) is held: on the int8 (or 4-bit) grid of the
# config, on a 16-bit integer grid, or in float.
ResidualPrecision = Literal["int8", "int16", "float"]
RESIDUAL_PRECISIONS: tuple[str, ...] = ("int8", "int16", "float")
# Which attention matmuls the XNNPACK target runs as int8 kernels (EscQuantizer's attention).
AttentionMatmuls = Literal["float", "scores", "int8"]
ATTENTION_MATMULS: tuple[str, ...] = ("float", "scores", "int8")

OP_ROLES: dict[object, Role] = {
    aten.linear.default: "weighted",
    aten.conv1d.default: "weighted",
    aten.conv2d.default: "weighted",
    aten.matmul.default: "matmul",
    aten.bmm.default: "matmul",
    aten.mm.default: "matmul",
    aten.add.Tensor: "binary",
    aten.sub.Tensor: "binary",
    aten.mul.Tensor: "binary",
    aten.layer_norm.default: "norm",
    aten.view.default: "passthrough",
    aten.reshape.default: "passthrough",
    aten.permute.default: "passthrough",
    aten.transpose.int: "passthrough",
    aten.t.default: "passthrough",
    aten.unsqueeze.default: "passthrough",
    aten.squeeze.dim: "passthrough",
    aten.flatten.using_ints: "passthrough",
    aten.unflatten.int: "passthrough",
    aten.contiguous.default: "passthrough",
    aten.clone.default: "passthrough",
    aten.select.int: "passthrough",
    aten.slice.Tensor: "passthrough",
    aten.expand.default: "passthrough",
    aten.dropout.default: "passthrough",
}


@dataclass(frozen=True)
class Specs:
    """The QuantizationSpec objects of one QuantConfig. The same objects are reused for
    every node so that prepare_pt2e's implicit sharing (equal specs on the edges of one
    producer) gives one observer per tensor."""

    activation: QuantizationSpec
    weight: QuantizationSpec
    wide: QuantizationSpec  # 16-bit activations, same method: the residual stream's grid
    dynamic: QuantizationSpec  # int8 input quantized at run time (XNNPACK's qd8 GEMMs)
    grouped: QuantizationSpec | None = None  # group-wise linear weights (QuantConfig.weight_group)
    group_size: int | None = None

    def weight_for(self, node: Node) -> QuantizationSpec:
        """The weight spec of a weighted op: group-wise for a linear whose input width
        the group divides, per-channel otherwise."""
        return self.grouped if uses_groups(node, self.group_size) and self.grouped is not None else self.weight


def uses_groups(node: Node, group_size: int | None) -> bool:
    """Whether a weighted op gets group-wise weights: a linear whose (out, in) weight has
    ``in`` a multiple of the group (convs keep per-channel weights)."""
    if group_size is None or node.target != aten.linear.default:
        return False
    w = node.args[1]
    val = w.meta.get("val") if isinstance(w, Node) else None
    return isinstance(val, torch.Tensor) and val.dim() == 2 and val.shape[1] % group_size == 0


def graph_outputs(nodes: Iterable[Node]) -> set[Node]:
    """Nodes whose value is a graph output, directly or through passthrough ops only: on
    the XNNPACK target their outputs stay float, since quantizing a tensor that leaves the
    program only rounds it (measured on Whisper tiny.en, the int8 logits and cross-attention
    keys and values cost 8 WER points of 12)."""
    out: set[Node] = set()
    frontier = [a for n in nodes if n.op == "output" for a in tree_leaves(n.args) if isinstance(a, Node)]
    while frontier:
        node = frontier.pop()
        if node in out:
            continue
        out.add(node)
        if OP_ROLES.get(node.target) == "passthrough" and isinstance(node.args[0], Node):
            frontier.append(node.args[0])
    return out


def residual_adds(nodes: Iterable[Node]) -> set[Node]:
    """The adds that carry a pre-LayerNorm transformer's residual stream: every add a
    LayerNorm reads (x + f(ln(x)) feeds the next block's LayerNorm and the final one; the
    embedding + positional add feeds the first block's). Their outputs hold the stream's
    outlier channels (Whisper tiny.en's last block: 633 against a 99.9th percentile of
    37), which one per-tensor int8 scale cannot share with the other channels."""
    return {
        n
        for n in nodes
        if n.op == "call_function"
        and n.target == aten.add.Tensor
        and any(u.op == "call_function" and u.target == aten.layer_norm.default for u in n.users)
    }


def float_tensor_inputs(node: Node) -> list[Node]:
    """Inputs of a node that are floating-point tensors, in argument order."""
    out = []
    for arg in node.args:
        if isinstance(arg, Node) and _is_float_tensor(arg):
            out.append(arg)
    return out


def _is_float_tensor(node: Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


@dataclass(frozen=True)
class Policy:
    """What a target does with an op of one role: whether the op's tensor inputs and its
    output are quantized, how the report says so, and (``skip``) why the op stays float."""

    inputs: bool
    output: bool
    report: str
    skip: str | None = None


# The annotation policy, read by annotate_node, by EscQuantizer's report and by the tests.
# Passthroughs are not in it: their output shares their input's grid wherever a quantized
# op consumes them.
POLICY: dict[tuple[str, str], Policy] = {
    ("reference", "weighted"): Policy(True, False, "per-channel weight, per-tensor input"),
    ("reference", "binary"): Policy(True, False, "per-tensor inputs"),
    ("reference", "matmul"): Policy(True, False, "per-tensor inputs"),
    ("reference", "norm"): Policy(True, True, "per-tensor input and output"),
    # a static int8 XNNPACK operator reads int8 and writes int8
    ("xnnpack", "weighted"): Policy(True, True, "per-channel weight, per-tensor input and output"),
    ("xnnpack", "binary"): Policy(True, True, "per-tensor inputs and output"),
    ("xnnpack", "matmul"): Policy(False, False, "", skip="XNNPACK runs bmm in float only (target='xnnpack')"),
    # LayerNorm runs as float ops; its input is already the int8 output of a residual add
    ("xnnpack", "norm"): Policy(False, True, "per-tensor output"),
}
# The XNNPACK target's attention matmuls that EscQuantizer's ``attention`` makes integer.
INT8_BMM_POLICY = Policy(True, True, "per-tensor inputs and output (XNNPACK's int8 batch matmul)")


def annotate_node(
    node: Node,
    role: Role,
    specs: Specs,
    target: Target = "reference",
    wide: frozenset[Node] = frozenset(),
    unquantized: frozenset[Node] = frozenset(),
    float_output: bool = False,
    policy: Policy | None = None,
) -> bool:
    """Writes the quantization annotation of one node; returns False when the node has
    nothing to quantize (e.g. a mul by a scalar). ``wide``: inputs read on the 16-bit grid
    (an int16 residual stream); ``unquantized``: inputs read as they are (a float one);
    ``float_output``: the output stays float (a graph output): a weighted op then takes
    a dynamically quantized input, which is how XNNPACK runs an int8 GEMM with a float
    output; other ops are left unannotated (returns False). ``policy``: instead of
    POLICY's for (target, role)."""
    if not _is_float_tensor(node):
        return False
    act = specs.activation

    def grid(x: Node) -> QuantizationSpec:
        return specs.wide if x in wide else act

    inputs: dict[Node, QuantizationSpec | SharedQuantizationSpec] = {}
    output: QuantizationSpec | SharedQuantizationSpec | None = None
    if float_output and role != "weighted":
        return False
    if role == "passthrough":
        x = node.args[0]
        if not isinstance(x, Node) or not _is_float_tensor(x):
            return False
        inputs, output = {x: act}, SharedQuantizationSpec((x, node))
    else:
        policy = POLICY[(target, role)] if policy is None else policy
        if role == "weighted":
            x, w = node.args[0], node.args[1]
            if not (isinstance(x, Node) and isinstance(w, Node)):
                return False
            # a float output (graph output, float stream): a dynamically quantized input
            inputs = {x: specs.dynamic if float_output else grid(x), w: specs.weight_for(node)}
        elif role in ("binary", "matmul"):
            tensors = float_tensor_inputs(node)
            if len(tensors) < 2:
                return False
            inputs = {t: grid(t) for t in tensors}
        else:  # norm
            x = node.args[0]
            if not isinstance(x, Node):
                return False
            inputs = {x: grid(x)}
        if not policy.inputs:
            inputs = {}
        output = act if policy.output and not float_output else None
    inputs = {x: spec for x, spec in inputs.items() if x not in unquantized}
    node.meta[ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map=inputs, output_qspec=output, _annotated=True)
    return True


def is_annotated(node: Node) -> bool:
    ann = node.meta.get(ANNOTATION_KEY)
    return ann is not None and bool(ann._annotated)
