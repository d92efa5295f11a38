"""A faster XNNPACK partitioner: same node groups, linear-time merging.

ExecuTorch 1.5's ``XnnpackPartitioner`` merges partitions with ``GroupBasedPartitioner``,
which tries every pair of partitions (quadratic in their number, each try walking the
downstream closure). On a fully quantized 16-layer Conformer (~6000 nodes) that step ran
for more than 8 minutes here. This subclass keeps the XNNPACK configs (which ops are
supported, and the groups that must stay together: a quantized linear with its
dequantize/quantize nodes) and merges with torch's ``CapabilityBasedPartitioner``, which
grows partitions greedily in one reverse-topological sweep. If that sweep splits a
group (seen on Whisper with dynamic int8 activations, where q, k and v share one
choose_qparams), the stock merge runs instead: a split group cannot be delegated, and
ops the partitioner asked to keep undecomposed must be.

``Int8BmmConfig`` replaces XNNPACK's bmm config, which declares fp32 only: a bmm that reads
two int8 dequantize nodes and writes one int8 quantize node is delegated with them, and
XNNPACK runs it as its static int8 batch matmul ("Batch Matrix Multiply (NC, QS8)"; both
operands are activations). XNNPACK refuses that operator when the second operand's zero
point is not 0 (``xnn_status_unsupported_parameter`` when the program loads, not when it
is written), so such a bmm, like every other, keeps the fp32 path.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
from executorch.backends.xnnpack.partition.config.generic_node_configs import BMMConfig
from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from torch.export import ExportedProgram
from torch.fx import Node
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner, Partition
from torch.fx.passes.operator_support import OperatorSupportBase

__all__ = ["FastXnnpackPartitioner", "Int8BmmConfig", "int8_bmm", "merge_groups"]

log = logging.getLogger(__name__)


class _InSet(OperatorSupportBase):
    def __init__(self, nodes: set[Node]) -> None:
        self.nodes = nodes

    def is_node_supported(self, submodules: object, node: Node) -> bool:
        return node in self.nodes


def merge_groups(gm: torch.fx.GraphModule, groups: Iterable[list[Node]]) -> list[Partition] | None:
    """Largest acyclic partitions made of whole groups, or None if the greedy sweep
    splits a group.

    A group's constant inputs (weight placeholders) may land in another partition: the
    lowering copies constants into every partition that reads them, so only the
    group's operator nodes must stay together.
    """
    live = [g for g in groups if g]
    supported = {n for g in live for n in g}
    parts = CapabilityBasedPartitioner(gm, _InSet(supported), allows_single_node_partition=True).propose_partitions()
    part_of = {n: p.id for p in parts for n in p.nodes}
    if any(len({part_of.get(n) for n in g if n.op == "call_function"}) > 1 for g in live):
        return None
    return parts


_Q = torch.ops.quantized_decomposed.quantize_per_tensor.default
_DQ = torch.ops.quantized_decomposed.dequantize_per_tensor.default


def _aten(node: object) -> object:
    """The ATen / quantized_decomposed overload behind an edge-dialect node's target."""
    target = getattr(node, "target", None)
    return getattr(target, "_op", target)


def int8_bmm(node: Node) -> bool:
    """Whether XNNPACK's static int8 batch matmul can run this bmm: both inputs int8
    dequantize nodes, the second with zero point 0, and one user, an int8 quantize."""
    ins = node.args[:2]
    if not all(isinstance(x, Node) and _aten(x) == _DQ and x.args[5] == torch.int8 for x in ins):
        return False
    if ins[1].args[2] != 0:  # type: ignore[union-attr]  # checked to be a Node above
        return False
    users = list(node.users)
    return bool(len(users) == 1 and _aten(users[0]) == _Q and users[0].args[5] == torch.int8)


class Int8BmmConfig(BMMConfig):
    """XNNPACK's bmm config, also taking int8 bmms (see module doc)."""

    def supported_precision_types(self) -> list[ConfigPrecisionType]:
        return [ConfigPrecisionType.FP32, ConfigPrecisionType.STATIC_QUANT]

    def get_node_and_deps(self, node: Node, ep: ExportedProgram) -> list[Node]:
        if not int8_bmm(node):
            return [node]  # what the fp32-only config returns
        return super().get_node_and_deps(node, ep)


class FastXnnpackPartitioner(XnnpackPartitioner):
    """``XnnpackPartitioner`` with linear-time partition merging and int8 bmms (see
    module doc)."""

    def __init__(self, **kwargs: object) -> None:
        configs = [Int8BmmConfig if c is BMMConfig else c for c in ALL_PARTITIONER_CONFIGS]
        super().__init__(configs=kwargs.pop("configs", configs), **kwargs)  # type: ignore[arg-type]

    def generate_partitions(self, ep: ExportedProgram) -> list[Partition]:
        if self.per_op_mode:
            return super().generate_partitions(ep)
        parts = merge_groups(ep.graph_module, self.get_matched_nodes_from_configs(ep))
        if parts is None:
            log.info("greedy partition merge split a node group; using XNNPACK's own (slower) merge")
            return super().generate_partitions(ep)
        return parts
