"""Lowering a converted PT2E graph (or a float model) to an ExecuTorch XNNPACK ``.pte``.

``to_executorch`` rewrites the graph so XNNPACK can take all of it (``passes``), lowers
with a partitioner that merges in linear time (``partition``), writes the program
atomically, then runs it through the ExecuTorch runtime and compares its outputs with
the graph it came from: a ``.pte`` that does not compute what was calibrated is an error,
not a file.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.fx import GraphModule

from esc_ao.atomic import atomic_path
from esc_ao.graph_prep import decompose_sdpa, drop_noop_casts
from esc_ao.lower.coverage import Coverage, collect_reasons, op_coverage
from esc_ao.lower.partition import FastXnnpackPartitioner
from esc_ao.lower.passes import prepare_for_xnnpack
from esc_ao.report import tensor_sqnr_db
from esc_ao.search.objectives import first_tensor

__all__ = ["LoweringError", "LoweringResult", "run_pte", "to_executorch"]

log = logging.getLogger(__name__)

# Op by op the .pte computes what the graph simulates: 52-65 dB (or bit-exact) between
# the two on single linears, convs, GELU/GLU/SiLU, softmax, LayerNorm, residual adds,
# attention and the Conformer conv module (W8A8). Through a deep model the few
# rounding ties that differ (int32 bias, fused requantization) flip values that the
# next quantizers amplify, so the whole-model outputs differ by about as much as each
# differs from float: 33 dB (W8A8) / 8.4 dB (W4A4) on the 2-layer test Conformer,
# 26.8 dB on the 16-layer one, 12.3 dB on Whisper's encoder whose W8A8 graph is itself
# only ~0 dB from float. So the meaningful check, when the float model is given, is that
# the program is as accurate as the graph: SQNR(program, float) >= SQNR(graph, float) -
# max_loss_db. Without it, a loose floor on SQNR(program, graph) still catches a broken
# lowering (a lost scale or clamp lands near or below 0 dB).
DEFAULT_MIN_SQNR_DB = {8: 10.0, 4: 3.0}
DEFAULT_MAX_LOSS_DB = 3.0


class LoweringError(RuntimeError):
    """The graph could not be lowered, or the lowered program computes something else."""


@dataclass
class LoweringResult:
    path: Path
    size_bytes: int
    sqnr_db: float  # program vs the lowered graph
    max_abs_diff: float
    coverage: Coverage
    lower_seconds: float
    graph_vs_float_db: float | None = None  # with a float reference: the graph's accuracy
    program_vs_float_db: float | None = None  # ... and the program's

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "sqnr_db": self.sqnr_db,
            "max_abs_diff": self.max_abs_diff,
            "lower_seconds": self.lower_seconds,
            "graph_vs_float_db": self.graph_vs_float_db,
            "program_vs_float_db": self.program_vs_float_db,
            "coverage": self.coverage.as_dict(),
        }


def _first_tensor(out: Any) -> torch.Tensor:
    try:
        return first_tensor(out)
    except TypeError as exc:
        raise LoweringError(
            f"the model's output is {type(out).__name__}; to_executorch checks a tensor "
            "(or a tuple whose first item is one)"
        ) from exc


def run_pte(path: str | Path, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Runs ``forward`` of a .pte with the ExecuTorch Python runtime."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(Path(path)).load_method("forward")
    return list(method.execute(list(inputs)))


def to_executorch(
    model: GraphModule | torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: str | Path,
    *,
    min_sqnr_db: float | None = None,
    act_bits: int = 8,
    check: bool = True,
    reference: torch.nn.Module | None = None,
    max_loss_db: float = DEFAULT_MAX_LOSS_DB,
) -> LoweringResult:
    """Lowers ``model`` (a converted PT2E graph or a float module) to an XNNPACK .pte.

    Args:
        model: the output of ``convert_pt2e`` / ``esc_ao.convert``, or a float module.
        example_inputs: inputs to export with and to check the program on.
        path: where the .pte goes (written atomically: a failed lowering leaves no file).
        min_sqnr_db: the least SQNR of the program's output against ``model``'s
            (default from ``act_bits``, see DEFAULT_MIN_SQNR_DB).
        act_bits: activation bits of the model, to pick the default tolerance.
        check: run the program and compare; ``False`` only writes it.
        reference: the float model ``model`` was quantized from. Given, the check is
            SQNR(program, float) >= SQNR(model, float) - ``max_loss_db`` instead of the
            ``min_sqnr_db`` floor (see DEFAULT_MIN_SQNR_DB for why).

    Raises:
        LoweringError: export or lowering failed, or the program fails its check (the
            file is then removed, nothing half-checked is left).
    """
    from executorch.exir import to_edge_transform_and_lower

    _load_quantized_kernels()

    if not isinstance(example_inputs, tuple) or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise TypeError("example_inputs must be a tuple of tensors, the inputs of the model's forward")
    path = Path(path)
    if path.suffix != ".pte":
        raise ValueError(f"path={str(path)!r} must end in .pte (ExecuTorch program)")
    if isinstance(model, GraphModule):
        _refuse_group_weights(model)
    start = time.perf_counter()
    graph = copy.deepcopy(model)
    if isinstance(graph, GraphModule):
        prepare_for_xnnpack(graph)
    else:
        graph = _float_graph(graph, example_inputs)
    try:
        exported = torch.export.export(graph, example_inputs)
        with collect_reasons() as reasons:
            edge = to_edge_transform_and_lower(exported, partitioner=[FastXnnpackPartitioner()])
        coverage = op_coverage(edge.exported_program(), reasons)
        program = edge.to_executorch()
    except Exception as exc:  # export and lowering raise many types; name the step
        raise LoweringError(f"lowering to ExecuTorch/XNNPACK failed: {type(exc).__name__}: {exc}") from exc
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(program.buffer)
    seconds = time.perf_counter() - start
    log.info("wrote %s (%.1f MB) in %.0f s: %s", path, path.stat().st_size / 1e6, seconds, coverage.summary())
    snr, diff = float("nan"), float("nan")
    if check:
        with torch.no_grad():
            want = _first_tensor(model(*example_inputs))
        got = run_pte(path, example_inputs)[0]
        snr, diff = tensor_sqnr_db(want, got), (want - got).abs().max().item()
        if reference is not None:
            with torch.no_grad():
                ideal = _first_tensor(reference(*example_inputs))
            graph_db, program_db = tensor_sqnr_db(ideal, want), tensor_sqnr_db(ideal, got)
            if not program_db >= graph_db - max_loss_db:
                path.unlink(missing_ok=True)
                raise LoweringError(
                    f"the lowered program is {program_db:.1f} dB from float, the graph it came from "
                    f"{graph_db:.1f} dB: more than max_loss_db={max_loss_db} lost in lowering; "
                    f"{coverage.summary()}"
                )
            return LoweringResult(path, path.stat().st_size, snr, diff, coverage, seconds, graph_db, program_db)
        floor = min_sqnr_db if min_sqnr_db is not None else DEFAULT_MIN_SQNR_DB.get(act_bits, 3.0)
        if not snr >= floor:
            path.unlink(missing_ok=True)
            raise LoweringError(
                f"the lowered program's output is {snr:.1f} dB from the model's "
                f"(max abs diff {diff:.3g}); below min_sqnr_db={floor}: {coverage.summary()}"
            )
    return LoweringResult(path, path.stat().st_size, snr, diff, coverage, seconds)


def _refuse_group_weights(model: GraphModule) -> None:
    """Group-wise weights (QuantConfig.weight_group) have no ExecuTorch kernel beside a
    static-input GEMM: XNNPACK runs them only behind dynamically quantized inputs and the
    portable quantized library has no group dequantize. Refused before any work."""
    nodes = [
        n.name
        for n in model.graph.nodes
        if n.target == torch.ops.quantized_decomposed.dequantize_per_channel_group.default
    ]
    if nodes:
        raise LoweringError(
            f"{len(nodes)} group-wise weight(s) ({', '.join(nodes[:3])}"
            f"{', ...' if len(nodes) > 3 else ''}): ExecuTorch has no kernel for group-wise weights "
            "with static int8 inputs; keep the converted program (model.pt2) for a target that runs "
            "them, or quantize with per-channel weights (weight_group=None) for a .pte"
        )


def _load_quantized_kernels() -> None:
    # Registers the out-variants of quantize/dequantize, for any that stay outside the
    # delegate (they then run as portable kernels instead of failing to_executorch).
    import executorch.kernels.quantized  # noqa: F401


def _float_graph(model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> GraphModule:
    # Float models get the same rewrites as quantized ones, so float-vs-int8 speed
    # comparisons measure the integer kernels, not a better graph.
    gm = torch.export.export(model.eval(), example_inputs).module()
    drop_noop_casts(gm)
    decompose_sdpa(gm)  # as EscQuantizer does: SDPA's edge decomposition has expand ops
    prepare_for_xnnpack(gm)
    return gm
