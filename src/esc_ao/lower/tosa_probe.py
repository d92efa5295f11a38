"""Op by op: where a TOSA program's integers part from the PT2E graph it was lowered from.

The output check (esc_ao.lower.ethosu.check_on_tosa) compares only the program's output.
Through a deep network, one LSB of rounding difference per op (TOSA rescales with an integer
multiplier and shift; the PT2E graph computes in float and rounds once) can grow to several
LSB at the output. To tell that from an op that is wrong, every quantized tensor of the
graph becomes an output of the lowered program (a copy of its dequantize outside the
delegate, so the program's integer ops are the same), the TOSA reference model runs it
once, and the PT2E graph is replayed with each quantized tensor replaced by the TOSA
program's value as soon as it is computed:

- the **accumulated** difference of a tensor: the graph run on its own against the program;
- the **own** difference of the op (chain) that writes it: the graph fed the program's own
  inputs for that op, so only that op's arithmetic differs.

Vela is not run (the TOSA program is what the reference model executes); the probed
program is never written as a deliverable.
"""

from __future__ import annotations

import contextlib
import copy
import operator
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch.fx import GraphModule, Interpreter, Node

from esc_ao.lower.executorch import LoweringError

__all__ = ["OpDiff", "ProbeReport", "probe_markdown", "probe_on_tosa"]

_Q = torch.ops.quantized_decomposed.quantize_per_tensor.default
_DQ = torch.ops.quantized_decomposed.dequantize_per_tensor.default


@dataclass(frozen=True)
class OpDiff:
    """One quantized tensor: the op that writes it, its own and accumulated difference
    (TOSA program minus PT2E graph, in LSB of the tensor's grid; int16 tensors on the int8
    grid the same range would have)."""

    node: str  # the graph's quantize node
    op: str  # the op whose output it quantizes
    elements: int
    own_max_lsb: int
    own_off: float  # fraction of elements more than `tolerance` LSB apart, own
    acc_mean_lsb: float
    acc_max_lsb: int
    acc_off: float


@dataclass
class ProbeReport:
    ops: list[OpDiff]
    tolerance: int
    lower_seconds: float
    run_seconds: float
    # probed tensors the program holds as one tensor with an earlier one (the backend
    # removed the op between them, e.g. a dropout, or merged equal ops): "later = earlier"
    shared: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "by_op": self.by_op()}

    def faulty(self) -> list[OpDiff]:
        """Ops whose own arithmetic, fed the program's inputs, is off by more than the
        tolerance anywhere."""
        return [o for o in self.ops if o.own_max_lsb > self.tolerance]

    def by_op(self) -> list[dict[str, Any]]:
        """Per op kind: how many tensors, the largest own difference, the fraction of
        elements off by more than the tolerance (own / accumulated, element-weighted)."""
        groups: dict[str, list[OpDiff]] = defaultdict(list)
        for o in self.ops:
            groups[o.op].append(o)
        rows = []
        for op, items in groups.items():
            n = sum(o.elements for o in items)
            rows.append(
                {
                    "op": op,
                    "tensors": len(items),
                    "own_max_lsb": max(o.own_max_lsb for o in items),
                    "own_off": sum(o.own_off * o.elements for o in items) / n,
                    "acc_max_lsb": max(o.acc_max_lsb for o in items),
                    "acc_off": sum(o.acc_off * o.elements for o in items) / n,
                }
            )
        return sorted(rows, key=lambda r: (-r["own_max_lsb"], -r["acc_off"]))


def _probe_nodes(gm: GraphModule) -> list[Node]:
    """Every quantize node inside what the delegate will hold that the input reaches: not
    the one quantizing the input itself (the program's interface), nor those of constants
    (LayerNorm's affine, folded tables), which cannot differ."""
    live: set[Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in live for a in n.all_input_nodes):
            live.add(n)
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and n.target == _Q
        and n in live
        and not (isinstance(n.args[0], Node) and n.args[0].op == "placeholder")
    ]


def _with_probe_outputs(converted: GraphModule) -> tuple[GraphModule, list[str], int]:
    """A copy of ``converted`` whose outputs are its own followed by every probed quantize
    node's value, each through a dequantize of its own (outside the delegate: the delegate
    then outputs the integer tensor, and its ops are unchanged)."""
    gm = copy.deepcopy(converted)
    probes = _probe_nodes(gm)
    if not probes:
        raise LoweringError(
            "the graph has no quantized tensor to probe: pass the converted graph (prepare_ethosu, the "
            "calibration batches, then convert), not a float or only prepared one"
        )
    out = next(n for n in gm.graph.nodes if n.op == "output")
    extra = []
    for q in probes:
        reader = next((u for u in q.users if u.target == _DQ), None)
        if reader is None:
            raise LoweringError(f"quantize node {q.name} has no dequantize reader: not a converted PT2E graph")
        with gm.graph.inserting_after(reader):
            dq = gm.graph.call_function(_DQ, reader.args, reader.kwargs)
        dq.meta = dict(reader.meta)
        extra.append(dq)
    own = out.args[0]
    own_list = list(own) if isinstance(own, (tuple, list)) else [own]
    out.args = ((*own_list, *extra),)
    gm.graph._codegen = torch.fx.graph.CodeGen()  # a flat tuple, not the original pytree
    gm.recompile()
    return gm, [q.name for q in probes], len(own_list)


@contextlib.contextmanager
def _tosa_only() -> Iterator[list[bytes]]:
    """Collects each delegate's TOSA flatbuffer in place of compiling it with Vela."""
    import executorch.backends.arm.ethosu.backend as backend
    from executorch.backends.arm.arm_vela import VelaCompileResult

    original = backend.vela_compile
    saved: list[bytes] = []

    def keep(tosa: bytes, *args: Any, **kwargs: Any) -> Any:
        saved.append(tosa)
        return VelaCompileResult(processed_bytes=b"", external_blocks=[])

    backend.vela_compile = keep
    try:
        yield saved
    finally:
        backend.vela_compile = original


def _lower_to_tosa(
    gm: GraphModule, example: tuple[torch.Tensor, ...], target: str, own_outputs: int
) -> tuple[bytes, list[int]]:
    """The TOSA program of ``gm`` and, for each output after the first ``own_outputs``,
    the index of the delegate output it reads. Read from the lowered graph, not assumed:
    the backend removes some ops (a dropout) and merges equal ones, so several probes may
    read one delegate output and the delegate's outputs are not in the probes' order."""
    from executorch.backends.arm.ethosu import EthosUPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    from esc_ao.lower.ethosu import compile_spec

    with _tosa_only() as saved:
        edge = to_edge_transform_and_lower(
            torch.export.export(gm, example),
            partitioner=[EthosUPartitioner(compile_spec(target))],
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
        )
    if len(saved) != 1:
        raise LoweringError(f"the probed program has {len(saved)} NPU delegates: the op probe needs exactly one")
    graph = edge.exported_program().graph_module.graph
    outputs = next(n for n in graph.nodes if n.op == "output").args[0]
    index = []
    for node in list(outputs)[own_outputs:]:
        item = node
        while isinstance(item, Node) and item.target is not operator.getitem:
            item = item.args[0] if item.args and isinstance(item.args[0], Node) else None  # through the dequantize
        if not isinstance(item, Node):
            raise LoweringError(f"probe output {node} does not read the delegate")
        index.append(int(item.args[1]))  # type: ignore[arg-type]
    return saved[0], index


class _Replay(Interpreter):
    """Runs the graph and keeps each probed quantize node's result in ``values``; with
    ``program`` given, what later ops read is the program's value instead."""

    def __init__(self, gm: GraphModule, program: dict[str, torch.Tensor] | None) -> None:
        super().__init__(gm)
        self.program = program
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: Node) -> Any:
        result = super().run_node(n)
        if n.op == "call_function" and n.target == _Q and (self.program is None or n.name in self.program):
            self.values[n.name] = result
            if self.program is not None:
                return self.program[n.name].reshape(result.shape).to(result.dtype)
        return result


def _op_name(src: Any) -> str:
    """ "add" for aten.add.Tensor; the node's kind for placeholders and constants."""
    if not isinstance(src, Node):
        return type(src).__name__
    if src.op != "call_function":
        return src.op
    target = src.target
    return str(getattr(target, "_opname", None) or getattr(target, "__name__", None) or target)


def _lsb(a: torch.Tensor, b: torch.Tensor, per_lsb: int) -> torch.Tensor:
    return (a.to(torch.int64) - b.to(torch.int64)).abs() // per_lsb


def probe_on_tosa(
    converted: GraphModule, example: tuple[torch.Tensor, ...], target: str, tolerance: int = 2
) -> ProbeReport:
    """Lowers ``converted`` (a graph prepared by esc_ao.lower.ethosu.prepare_ethosu and
    converted) to one TOSA program with every quantized tensor as an output, runs it on the
    TOSA reference model with ``example`` and returns each tensor's own and accumulated
    difference from the graph."""
    from esc_ao.lower.ethosu import _edge_qparams, _require, run_tosa_program

    _require()
    t0 = time.perf_counter()
    probed, names, own_outputs = _with_probe_outputs(converted)
    tosa, index = _lower_to_tosa(probed, example, target, own_outputs)
    lower_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    outs = run_tosa_program(tosa, example[0], _edge_qparams(converted)[0])
    run_s = time.perf_counter() - t1
    with torch.no_grad():
        plain = _Replay(converted, None)
        plain.run(*example)
    program: dict[str, torch.Tensor] = {}
    for name, k in zip(names, index):
        ref = plain.values[name]
        if outs[k].size != ref.numel():
            raise LoweringError(
                f"delegate output {k} for {name} has {outs[k].size} elements, the graph's {ref.numel()}"
            )
        program[name] = torch.from_numpy(outs[k].astype(np.int64)).reshape(ref.shape)
    first_reader: dict[int, str] = {}
    shared = []
    for name, k in zip(names, index):
        if first_reader.setdefault(k, name) != name:
            shared.append(f"{name} = {first_reader[k]}")
    with torch.no_grad():
        replay = _Replay(converted, program)
        replay.run(*example)
    nodes = {n.name: n for n in converted.graph.nodes}
    rows = []
    for name in names:
        q = nodes[name]
        per_lsb = 256 if int(q.args[4]) > 127 else 1
        own = _lsb(replay.values[name], program[name], per_lsb)
        acc = _lsb(plain.values[name], program[name], per_lsb)
        src = q.args[0]
        rows.append(
            OpDiff(
                node=name,
                op=_op_name(src),
                elements=own.numel(),
                own_max_lsb=int(own.max()),
                own_off=float((own > tolerance).float().mean()),
                acc_mean_lsb=float(acc.float().mean()),
                acc_max_lsb=int(acc.max()),
                acc_off=float((acc > tolerance).float().mean()),
            )
        )
    return ProbeReport(rows, tolerance, round(lower_s, 1), round(run_s, 2), shared)


def probe_markdown(report: ProbeReport, limit: int = 12) -> str:
    """The per-op-kind table and the tensors that differ most on their own."""
    lines = [
        f"Own: the op fed the TOSA program's own inputs; accumulated: the graph run on its own. "
        f"Off: elements more than {report.tolerance} LSB apart.",
        "",
        "| op | tensors | own max LSB | own off % | accumulated max LSB | accumulated off % |",
        "|---|---|---|---|---|---|",
    ]
    for r in report.by_op():
        lines.append(
            f"| {r['op']} | {r['tensors']} | {r['own_max_lsb']} | {100 * r['own_off']:.3f} | "
            f"{r['acc_max_lsb']} | {100 * r['acc_off']:.2f} |"
        )
    if report.shared:
        lines += [
            "",
            f"{len(report.shared)} probed tensor(s) are one program tensor with an earlier one (the backend "
            "removed or merged their op): "
            + ", ".join(report.shared[:limit])
            + (" ..." if len(report.shared) > limit else ""),
        ]
    worst = sorted(report.ops, key=lambda o: (-o.own_max_lsb, -o.own_off))[:limit]
    lines += ["", "| tensor | op | own max LSB | own off % | accumulated mean / max LSB |", "|---|---|---|---|---|"]
    for o in worst:
        lines.append(
            f"| {o.node} | {o.op} | {o.own_max_lsb} | {100 * o.own_off:.3f} | {o.acc_mean_lsb:.2f} / {o.acc_max_lsb} |"
        )
    return "\n".join(lines) + "\n"
