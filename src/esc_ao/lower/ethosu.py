"""Arm Ethos-U NPUs: graphs prepared by Arm's own quantizer, lowered by ExecuTorch's Arm
backend (TOSA, then Vela), checked on the TOSA reference model.

    prepared = prepare_ethosu(model, example, "ethos-u85-256")   # EthosUQuantizer, int8
    for batch in calibration: prepared(*batch)                  # its observers see data
    esc_ao.calibrate(prepared, calibration)                      # ESC searches them (optional)
    result = lower_ethosu(convert(prepared), example, out_dir, "ethos-u85-256", reference=model)

Needs ``tosa-tools``, ``ethos-u-vela`` and ``ml-dtypes`` (``requirements-npu.txt``, installed
with ``--no-deps``: tosa-tools pins an older numpy than torch's stack has, and runs with it);
ExecuTorch's wheel holds the Arm backend but its runtime has no Ethos-U delegate, so the
``.pte`` is written and measured (Vela) but runs only on the device or its simulator. What
runs here is the TOSA reference model: the integer program Vela compiles, op for op.

Traps handled here (ExecuTorch 1.5.1): the Arm passes need the exported module without
its guard node (``check_guards=False``); every delegate's Vela run writes the same summary
file, so each is given its own folder; an accelerator name with a valid family but an
invalid size passes the compile spec and fails inside Vela's argument parser
(``SystemExit``), so names are checked against Vela's own list first.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.fx import GraphModule, Node

from esc_ao.lower.executorch import DEFAULT_MAX_LOSS_DB, LoweringError
from esc_ao.report import tensor_sqnr_db

__all__ = [
    "ARM_PACKAGES",
    "DelegateFigures",
    "EthosUResult",
    "TosaCheck",
    "accelerators",
    "check_accelerator",
    "lower_ethosu",
    "prepare_ethosu",
    "run_tosa_program",
    "tie_duplicate_observers",
    "vela_sweep",
]

log = logging.getLogger(__name__)

ARM_PACKAGES = "--no-deps tosa-tools==2026.8.0 ethos-u-vela==5.2.0 ml-dtypes==0.6.0"
# The TOSA program must agree with the PT2E graph it came from: at most this many LSB on
# all but a 1e-3 fraction of the output's elements (int8 LSB; int16 outputs are compared
# on the int8 grid the same range would have, 256 of their LSB).
MAX_LSB = 2
MAX_OFF_FRACTION = 1e-3


def _require() -> None:
    missing = []
    for module, package in (("ethosu.vela", "ethos-u-vela"), ("tosa_reference_model", "tosa-tools")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise ImportError(
            f"the Ethos-U target needs {', '.join(missing)}: pip install {ARM_PACKAGES} "
            "(the pins of requirements-npu.txt; --no-deps keeps torch's numpy)"
        )


def accelerators() -> list[str]:
    """Vela's accelerator configurations (ethos-u55-32 ... ethos-u85-2048)."""
    _require()
    from ethosu.vela.architecture_features import Accelerator

    return list(Accelerator.member_list())


def check_accelerator(target: str) -> str:
    names = accelerators()
    if target not in names:
        raise ValueError(f"target={target!r} is not an Ethos-U accelerator Vela knows: use one of {', '.join(names)}")
    return target


def _vela_ini() -> str:
    import ethosu

    # ethosu is a namespace package: no __file__, one folder on its __path__
    path = Path(next(iter(ethosu.__path__))) / "config_files" / "Arm" / "vela.ini"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the ethos-u-vela package lacks its vela.ini; reinstall ethos-u-vela")
    return str(path)


def compile_spec(target: str) -> Any:
    from executorch.backends.arm.ethosu import EthosUCompileSpec

    return EthosUCompileSpec(check_accelerator(target), config_ini=_vela_ini())


def prepare_ethosu(model: torch.nn.Module, example: tuple[Any, ...], target: str, a16w8: bool = False) -> GraphModule:
    """``model`` exported and prepared by Arm's ``EthosUQuantizer`` (symmetric, per-channel
    int8 weights; int8 activations, or int16 with ``a16w8``). LayerNorm and softmax are
    decomposed before annotation, so every step of them has an observer of its own."""
    from executorch.backends.arm.quantizer import (
        EthosUQuantizer,
        get_symmetric_a16w8_quantization_config,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    quantizer = EthosUQuantizer(compile_spec(target))
    quantizer.set_global(
        get_symmetric_a16w8_quantization_config(is_per_channel=True)
        if a16w8
        else get_symmetric_quantization_config(is_per_channel=True)
    )
    # Arm's passes cannot run a guard node (call_module _guards_fn): export without one. A
    # module from a saved program is re-exported as it is (eval() is refused on those).
    module = model if isinstance(model, GraphModule) else model.eval()
    gm = torch.export.export(module, example).module(check_guards=False)
    prepared = prepare_pt2e(gm, quantizer)  # type: ignore[arg-type]
    tie_duplicate_observers(prepared)
    return prepared


def _freeze(value: Any, canon: dict[Node, Node]) -> Any:
    if isinstance(value, Node):
        return canon.get(value, value)
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v, canon) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v, canon)) for k, v in value.items()))
    return value if isinstance(value, (int, float, str, bool, type(None), torch.dtype)) else repr(value)


def tie_duplicate_observers(prepared: GraphModule) -> int:
    """Makes ops that compute the same thing share one output observer; returns how many
    observers were tied.

    Arm's quantizer decomposes LayerNorm into a centring mean and a variance that computes
    the same mean again, each ``sum`` with an observer of its own. After folding q/dq into
    node metadata, the backend's FuseDuplicateUsersPass merges ops by target and arguments
    only, so one sum feeds both readers at its own scale while the other's readers
    dequantize with theirs. That is harmless while both observers saw the same data and
    agree; once a search moves them apart, the program reads one tensor on the wrong scale
    (measured on a small block: 55 LSB on the merged sum, 2-4 LSB at the output; bit-exact
    with the scales tied). Ties cascade: the readers of tied observers (the means' 1/N
    multiplications) are duplicates in turn."""
    from torchao.quantization.pt2e.observer import ObserverBase

    canon: dict[Node, Node] = {}  # observer call -> the first call of the same observer module
    first_call: dict[str, Node] = {}
    seen: dict[Any, Node] = {}
    tied = 0

    def is_observer(n: Node) -> bool:
        return n.op == "call_module" and isinstance(prepared.get_submodule(str(n.target)), ObserverBase)

    def observer_users(n: Node) -> list[Node]:
        return [u for u in n.users if is_observer(u)]

    for n in prepared.graph.nodes:
        if is_observer(n):
            canon[n] = first_call.setdefault(str(n.target), n)
            continue
        if n.op != "call_function":
            continue
        key = (n.target, _freeze(n.args, canon), _freeze(n.kwargs, canon))
        twin = seen.setdefault(key, n)
        if twin is n:
            continue
        mine, theirs = observer_users(n), observer_users(twin)
        if len(mine) == 1 and len(theirs) == 1 and mine[0].target != theirs[0].target:
            mine[0].target = theirs[0].target
            tied += 1
    if tied:
        prepared.recompile()
        log.info("tied %d observer(s) of duplicate ops (the backend merges such ops)", tied)
    return tied


@dataclass(frozen=True)
class DelegateFigures:
    """Vela's estimate for one NPU delegate (memory in KiB, as Vela reports it)."""

    index: int
    tosa: str
    accelerator: str
    npu_ops: int
    cpu_ops: int
    cycles_npu: int
    cycles_total: int
    inference_ms: float
    sram_kib: float
    flash_kib: float
    dram_kib: float


@dataclass(frozen=True)
class TosaCheck:
    """The TOSA reference model's output against the PT2E graph's (on its integer grid)
    and against float."""

    lsb_histogram: dict[str, int]  # "0", "1", "2", ">2"
    max_lsb: int
    off_fraction: float  # elements more than MAX_LSB apart
    tosa_vs_graph_db: float
    tosa_vs_float_db: float | None
    graph_vs_float_db: float | None
    milliseconds: float


@dataclass
class EthosUResult:
    target: str
    pte: str
    size_bytes: int
    delegates: list[DelegateFigures]
    delegated_ops: int
    cpu_ops: dict[str, int]  # op -> count left outside the delegates (quantize/dequantize at the edges included)
    rejected: list[dict[str, str]]  # node, op, reason the partitioner gave
    check: TosaCheck | None
    check_skipped: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        d = self.delegates
        ms = sum(x.inference_ms for x in d)
        text = (
            f"{len(d)} NPU delegate(s), {self.delegated_ops} ops on the NPU, "
            f"{sum(self.cpu_ops.values())} on the CPU; Vela: {ms:.3f} ms, "
            f"SRAM {max((x.sram_kib for x in d), default=0):.1f} KiB"
        )
        if self.check is not None:
            text += (
                f"; TOSA model vs graph: {100 * (1 - self.check.off_fraction):.2f} % within {MAX_LSB} LSB "
                f"(max {self.check.max_lsb})"
            )
        return text


def _read_vela_csv(folder: Path) -> dict[str, str]:
    found = sorted((folder / "output").glob("*_summary_*.csv"))
    if not found:
        raise LoweringError(f"Vela wrote no summary in {folder / 'output'}")
    with open(found[0]) as f:
        return next(csv.DictReader(f))


def _figures(index: int, folder: Path, stdout: str) -> DelegateFigures:
    row = _read_vela_csv(folder)
    npu = cpu = 0
    for line in stdout.splitlines():  # "CPU operators = 0 (0.0%)" / "NPU operators = 57 (100.0%)"
        if "CPU operators =" in line:
            cpu = int(line.split("=")[1].split()[0])
        if "NPU operators =" in line:
            npu = int(line.split("=")[1].split()[0])

    def kib(key: str) -> float:
        return float(row.get(key) or 0.0)

    return DelegateFigures(
        index=index,
        tosa=str(folder / "out.tosa"),
        accelerator=row.get("accelerator_configuration", ""),
        npu_ops=npu,
        cpu_ops=cpu,
        cycles_npu=int(float(row["cycles_npu"])),
        cycles_total=int(float(row["cycles_total"])),
        inference_ms=1000.0 * float(row["inference_time"]),
        sram_kib=kib("sram_memory_used"),
        flash_kib=kib("off_chip_flash_memory_used") + kib("on_chip_flash_memory_used"),
        dram_kib=kib("dram_memory_used"),
    )


@contextlib.contextmanager
def _vela_per_delegate(work: Path) -> Iterator[list[DelegateFigures]]:
    """Gives every delegate's Vela run a folder of its own (they share file names) and
    collects its figures."""
    import executorch.backends.arm.ethosu.backend as backend

    original = backend.vela_compile
    figures: list[DelegateFigures] = []

    def keep(tosa: Any, args: Any, verbose: bool = False, intermediate_path: Any = None, **kw: Any) -> Any:
        folder = work / f"delegate{len(figures)}"
        folder.mkdir(parents=True)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            result = original(tosa, args, verbose=verbose, intermediate_path=str(folder), **kw)
        (folder / "vela.txt").write_text(out.getvalue())
        figures.append(_figures(len(figures), folder, out.getvalue()))
        return result

    backend.vela_compile = keep
    try:
        yield figures
    finally:
        backend.vela_compile = original


@contextlib.contextmanager
def _rejections() -> Iterator[list[dict[str, str]]]:
    """Every node the partitioner keeps off the NPU, with the reason it gives (read at the
    reporter ExecuTorch's partitioners share, not parsed from its log table)."""
    from executorch.exir.backend.utils import WhyNoPartitionReporter

    original = WhyNoPartitionReporter.report_reject
    rows: list[dict[str, str]] = []

    def report(self: Any, node: Node, reason: str) -> None:
        # placeholders, parameters and the output are "rejected" too: only ops are news
        if node.op == "call_function" and not any(r["node"] == node.name for r in rows):
            rows.append({"node": node.name, "op": str(node.target), "reason": reason})
        original(self, node, reason)

    WhyNoPartitionReporter.report_reject = report  # type: ignore[method-assign]
    try:
        yield rows
    finally:
        WhyNoPartitionReporter.report_reject = original  # type: ignore[method-assign]


def _edge_qparams(converted: GraphModule) -> tuple[tuple[float, int, int, int], tuple[float, int]]:
    """((scale, zero point, qmin, qmax) of the input's quantize, (scale, zero point) of the
    output's dequantize): the integer interface of a whole-graph delegate."""
    quant = [
        n
        for n in converted.graph.nodes
        if n.op == "call_function" and "quantize_per_tensor" in str(n.target) and "dequant" not in str(n.target)
    ]
    out_node = next(n for n in converted.graph.nodes if n.op == "output")
    dq: Any = out_node.args[0][0] if isinstance(out_node.args[0], (list, tuple)) else out_node.args[0]
    if not quant or not isinstance(dq, Node) or "dequantize_per_tensor" not in str(dq.target):
        raise LoweringError("the converted graph does not start with a quantize and end with a dequantize")
    qa: Any = quant[0].args
    da: Any = dq.args
    return (float(qa[1]), int(qa[2]), int(qa[3]), int(qa[4])), (float(da[1]), int(da[2]))


def run_tosa_program(tosa: bytes, x: torch.Tensor, grid: tuple[float, int, int, int]) -> list[np.ndarray]:
    """The TOSA reference model's outputs (integers) for the float input ``x``, quantized
    on ``grid`` (scale, zero point, qmin, qmax: the program's input quantize, from
    ``_edge_qparams``)."""
    import tosa_reference_model as trm

    scale, zero_point, qmin, qmax = grid
    dtype = np.int16 if qmax > 127 else np.int8
    xq = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax).to(torch.int64).numpy().astype(dtype)
    outs, status = trm.run(tosa, [xq])
    if "VALID" not in str(status):
        raise LoweringError(f"the TOSA reference model refused the program: {status}")
    return list(outs)


def check_on_tosa(
    tosa: Path, converted: GraphModule, example: tuple[torch.Tensor, ...], reference: torch.nn.Module | None
) -> TosaCheck:
    """Runs the TOSA program on the reference model and compares it with the converted
    graph on the graph's output grid."""
    grid, (out_s, out_zp) = _edge_qparams(converted)
    with torch.no_grad():
        graph_out = converted(*example)
        graph_out = graph_out[0] if isinstance(graph_out, (list, tuple)) else graph_out
        float_out = reference(*example) if reference is not None else None
        float_out = float_out[0] if isinstance(float_out, (list, tuple)) else float_out
    t0 = time.perf_counter()
    outs = run_tosa_program(tosa.read_bytes(), example[0], grid)
    ms = 1000 * (time.perf_counter() - t0)
    tosa_q = torch.from_numpy(outs[0].astype(np.int64)).reshape(graph_out.shape)
    graph_q = torch.round(graph_out / out_s).to(torch.int64) + out_zp
    per_lsb = 256 if grid[3] > 127 else 1  # compare int16 outputs on the int8 grid
    diff = (tosa_q - graph_q).abs() // per_lsb
    tosa_f = (tosa_q - out_zp).float() * out_s
    return TosaCheck(
        lsb_histogram={
            "0": int((diff == 0).sum()),
            "1": int((diff == 1).sum()),
            "2": int((diff == 2).sum()),
            ">2": int((diff > 2).sum()),
        },
        max_lsb=int(diff.max()),
        off_fraction=float((diff > MAX_LSB).float().mean()),
        tosa_vs_graph_db=tensor_sqnr_db(graph_out, tosa_f),
        tosa_vs_float_db=tensor_sqnr_db(float_out, tosa_f) if float_out is not None else None,
        graph_vs_float_db=tensor_sqnr_db(float_out, graph_out) if float_out is not None else None,
        milliseconds=ms,
    )


def _refusal(check: TosaCheck, max_loss_db: float) -> str:
    """Why a program must not be written ("" when it may). With the float model known, as
    ``to_executorch`` does: the program may not be further from float than the graph by
    more than ``max_loss_db``. Per-op rounding (TOSA rescales with an integer multiplier,
    the graph rounds a float once) makes 1-LSB differences that grow through deep
    networks (measured: the AST's every op within 1 LSB on its own, its logits up to 5 LSB
    apart), so an LSB count alone would refuse working programs. Without the float model,
    the LSB rule."""
    if check.tosa_vs_float_db is not None and check.graph_vs_float_db is not None:
        if not check.tosa_vs_float_db >= check.graph_vs_float_db - max_loss_db:
            return (
                f"the TOSA program is {check.tosa_vs_float_db:.2f} dB from float where the converted graph is "
                f"{check.graph_vs_float_db:.2f} dB (more than {max_loss_db} dB lost; {check.lsb_histogram} LSB)"
            )
        return ""
    if check.off_fraction > MAX_OFF_FRACTION:
        return (
            f"the TOSA program disagrees with the converted graph by more than {MAX_LSB} LSB on "
            f"{100 * check.off_fraction:.2f} % of its outputs (max {check.max_lsb} LSB, "
            f"histogram {check.lsb_histogram})"
        )
    return ""


def lower_ethosu(
    converted: GraphModule,
    example: tuple[torch.Tensor, ...],
    out_dir: Path,
    target: str,
    reference: torch.nn.Module | None = None,
    max_loss_db: float = DEFAULT_MAX_LOSS_DB,
) -> EthosUResult:
    """Lowers a graph prepared by ``prepare_ethosu`` and converted to ExecuTorch's Arm
    backend: writes ``model.pte``, one folder per NPU delegate (its ``.tosa``, Vela's
    summary and log) and returns the figures. With a single delegate covering the graph,
    its TOSA program runs on the reference model against the converted graph (and
    ``reference``, the float model): a program more than ``max_loss_db`` further from float
    than the graph (without ``reference``: more than MAX_LSB from the graph on more than
    MAX_OFF_FRACTION of its outputs) raises LoweringError; one that is as accurate but
    misses the LSB target says so in ``notes``.
    """
    from executorch.backends.arm.ethosu import EthosUPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = compile_spec(target)
    program = torch.export.export(converted, example)
    # At INFO the backend passes --verbose-all to Vela, which prints every NPU command.
    backend_log = logging.getLogger("executorch.backends.arm.ethosu.backend")
    level = backend_log.level
    backend_log.setLevel(logging.WARNING)
    try:
        with _rejections() as rejected, _vela_per_delegate(out_dir / "vela") as figures:
            edge = to_edge_transform_and_lower(
                program,
                partitioner=[EthosUPartitioner(spec)],
                compile_config=EdgeCompileConfig(_check_ir_validity=False),
            )
    except SystemExit as exc:  # Vela's argument parser exits on what it cannot read
        raise LoweringError(f"Vela refused the program for {target} (exit {exc.code})") from None
    finally:
        backend_log.setLevel(level)
    info = get_delegation_info(edge.exported_program().graph_module)
    cpu_ops = {op: b.non_delegated for op, b in info.delegation_by_operator.items() if b.non_delegated}
    delegated = sum(b.delegated for b in info.delegation_by_operator.values())
    pte = out_dir / "model.pte"
    edge.to_executorch().write_to_file(open(pte, "wb"))  # noqa: SIM115 - write_to_file wants a file
    check, skipped, notes = None, "", []
    if len(figures) == 1:
        check = check_on_tosa(Path(figures[0].tosa), converted, example, reference)
        if refusal := _refusal(check, max_loss_db):
            pte.unlink(missing_ok=True)  # a refused program is not left behind as if it worked
            raise LoweringError(
                f"{refusal}: not written as a working program; "
                "esc_ao.lower.tosa_probe.probe_on_tosa compares every quantized tensor and names the op"
            )
        if check.off_fraction > MAX_OFF_FRACTION:
            notes.append(
                f"the output is more than {MAX_LSB} LSB from the graph's on {100 * check.off_fraction:.2f} % of its "
                f"elements (max {check.max_lsb}) while as close to float as the graph (within {max_loss_db} dB); "
                "esc_ao.lower.tosa_probe.probe_on_tosa tells per-op rounding that accumulates from an op that is off"
            )
    else:
        skipped = f"{len(figures)} delegates: the TOSA check runs on single-delegate programs only"
    return EthosUResult(
        target=target,
        pte=str(pte),
        size_bytes=pte.stat().st_size,
        delegates=list(figures),
        delegated_ops=delegated,
        cpu_ops=cpu_ops,
        rejected=rejected,
        check=check,
        check_skipped=skipped,
        seconds=time.perf_counter() - t0,
        notes=notes,
    )


def vela_sweep(tosa: Path, targets: Sequence[str], work: Path) -> list[dict[str, Any]]:
    """Vela's estimate of one saved TOSA program on other accelerator configurations (a
    few tens of milliseconds each). A configuration that cannot run an op gets the reason."""
    from ethosu.vela import vela

    rows = []
    for target in targets:
        folder = work / target
        (folder / "output").mkdir(parents=True, exist_ok=True)
        argv = [*compile_spec(target).compiler_flags, f"--output-dir={folder / 'output'}", str(tosa)]
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                vela.main(argv)
        except (RuntimeError, SystemExit) as exc:
            rows.append({"target": target, "error": str(exc) or type(exc).__name__})
            continue
        fig = _figures(0, folder, out.getvalue())
        rows.append({"target": target, **{k: v for k, v in asdict(fig).items() if k not in ("index", "tosa")}})
    return rows
