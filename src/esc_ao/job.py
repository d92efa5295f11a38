"""The main job: quantize a model end to end and write the program and a report.

``quantize_job`` works for any exportable model; ``whisper_default`` supplies the embedded
default (Whisper tiny.en's encoder and the bundled clips).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.fx import GraphModule

from esc_ao.atomic import staged_dir, write_json_atomic, write_text_atomic
from esc_ao.config import QuantConfig, SearchConfig
from esc_ao.pipeline import Batch, as_batches, convert, export_model, observe, save_program
from esc_ao.precision import PrecisionPlan
from esc_ao.recipe import Prepared, Recipe
from esc_ao.render import plot_convergence, render_markdown
from esc_ao.report import ObserverStats, layer_sqnr, observer_stats, output_sqnr, weight_bytes
from esc_ao.search.calibrate import CalibrationResult, calibrate
from esc_ao.search.objectives import Objective
from esc_ao.transforms.records import TransformRecord

__all__ = ["JobInputs", "JobReport", "LayerRow", "NpuTarget", "quantize_job", "whisper_default"]

# Accelerator sizes the NPU report re-estimates a saved TOSA program for (Vela, milliseconds each).
NPU_SWEEP = ("ethos-u55-128", "ethos-u55-256", "ethos-u65-256", "ethos-u85-128", "ethos-u85-256", "ethos-u85-512")

log = logging.getLogger(__name__)


@dataclass
class JobInputs:
    """A model and its data: calibration batches, and held-out batches to report on."""

    name: str
    model: torch.nn.Module
    calibration: list[Batch]
    heldout: list[Batch]
    notes: dict[str, Any] = field(default_factory=dict)
    # The task metric of a model (float or quantized) on the held-out data, for the report.
    task_metric: Callable[[torch.nn.Module], dict[str, Any]] | None = None


@dataclass(frozen=True)
class NpuTarget:
    """An Arm Ethos-U accelerator (Vela's name, e.g. "ethos-u85-256"): the graph is prepared
    by Arm's own quantizer (int8 activations, or int16 with ``a16w8``) instead of
    EscQuantizer, and lowered by ExecuTorch's Arm backend (esc_ao.lower.ethosu)."""

    accelerator: str
    a16w8: bool = False
    sweep: tuple[str, ...] = NPU_SWEEP


@dataclass(frozen=True)
class LayerRow:
    """One annotated op: whether it was quantized (and why not), and its output's SQNR
    against float on the first held-out batch (None where it was not measured)."""

    node: str
    op: str
    module: str
    quantized: bool
    reason: str
    sqnr_db: float | None


@dataclass
class JobReport:
    """What the main job measured and wrote. ``to_dict()`` is the ``report.json`` form,
    which ``esc_ao.render.render_markdown`` reads (so a saved report renders again)."""

    model: str
    config: QuantConfig
    recipe: Recipe
    transforms: list[TransformRecord]
    precision_plan: PrecisionPlan | None
    keep_float: list[str]
    calibration_batches: int
    heldout_batches: int
    output_sqnr_db: float
    task: dict[str, dict[str, Any]] | None
    calibration_seconds: float
    layers: list[LayerRow]
    activations: list[ObserverStats]
    # float32_bytes, quantized_bytes, and program_file_bytes once model.pt2 is written.
    size: dict[str, int]
    notes: dict[str, Any]
    esc: CalibrationResult | None
    # Set when model.pte was written: esc_ao.lower's LoweringResult.as_dict(), path, summary.
    executorch: dict[str, Any] | None = None
    # Set for an Ethos-U target once lowered: EthosUResult.as_dict(), summary, the Vela sweep.
    ethosu: dict[str, Any] | None = None
    # Set when the job returns (writing the outputs included).
    total_seconds: float | None = None
    npu: NpuTarget | None = None

    def to_dict(self) -> dict[str, Any]:
        cfg = self.config
        out: dict[str, Any] = {
            "model": self.model,
            "config": {
                "weight_bits": cfg.weight_bits,
                "act_bits": cfg.act_bits,
                "method": cfg.method,
                "act_symmetric": cfg.act_symmetric,
                "label": cfg.label,
            },
            "target": self.npu.accelerator if self.npu else self.recipe.target,
            "recipe": (
                {"suffix": "", "description": f"Arm's EthosUQuantizer ({'a16w8' if self.npu.a16w8 else 'int8'})"}
                if self.npu
                else {"suffix": self.recipe.suffix, "description": self.recipe.describe(), **asdict(self.recipe)}
            ),
            "transforms": [asdict(r) for r in self.transforms],
            "precision_plan": (
                {"summary": self.precision_plan.summary(), **self.precision_plan.to_dict()}
                if self.precision_plan
                else None
            ),
            "keep_float": self.keep_float,
            "calibration_batches": self.calibration_batches,
            "heldout_batches": self.heldout_batches,
            "output_sqnr_db": self.output_sqnr_db,
            "task": self.task,
            "calibration_seconds": self.calibration_seconds,
            "layers": [asdict(r) for r in self.layers],
            "activations": [asdict(a) for a in self.activations],
            "size": self.size,
            "notes": self.notes,
            "esc": self.esc.to_dict() if self.esc is not None else None,
        }
        if self.executorch is not None:
            out["executorch"] = self.executorch
        if self.ethosu is not None:
            out["ethosu"] = self.ethosu
        if self.total_seconds is not None:
            out["total_seconds"] = self.total_seconds
        return out


def whisper_default(n_calibration: int | None = None) -> JobInputs:
    """Whisper tiny.en's encoder, the bundled calibration clips and held-out clips (the
    held-out clips are voices calibration never hears)."""
    from esc_ao.speech import WhisperEncoder, bundled_clips, load_whisper_tiny_en, whisper_mel

    calib = bundled_clips("calibration")
    if n_calibration is not None:
        if not 1 <= n_calibration <= len(calib):
            raise ValueError(f"n_calibration={n_calibration} must lie in 1..{len(calib)} (bundled clips)")
        calib = calib[:n_calibration]
    held = bundled_clips("heldout")
    whisper = load_whisper_tiny_en().eval()
    encoder = WhisperEncoder(whisper).eval()
    return JobInputs(
        name="whisper-tiny.en-encoder",
        model=encoder,
        calibration=[(whisper_mel(c.audio),) for c in calib],
        heldout=[(whisper_mel(c.audio),) for c in held],
        notes={
            "calibration_voices": sorted({c.voice for c in calib}),
            "heldout_voices": sorted({c.voice for c in held}),
        },
        task_metric=lambda enc: _heldout_wer(whisper, enc, held),
    )


def _heldout_wer(whisper: torch.nn.Module, encoder: torch.nn.Module, clips: Sequence[Any]) -> dict[str, Any]:
    """WER of greedy transcripts of the held-out clips with ``encoder`` in place of
    Whisper's own and the float decoder: what the quantized encoder does to transcripts."""
    from esc_ao.bench.whisper_task import encoder_transcripts
    from esc_ao.metrics import wer

    hyps = encoder_transcripts(whisper, encoder, [(c.audio, len(c.audio) / 16000) for c in clips])
    est = wer([c.text for c in clips], hyps, seed=0)
    return {"wer": est.value, "utterances": len(clips), "hypotheses": hyps}


def quantize_job(
    inputs: JobInputs,
    config: QuantConfig,
    out_dir: Path | None,
    keep_float: Sequence[str] = (),
    graph: GraphModule | None = None,
    search: SearchConfig | None = None,
    objective: Objective | None = None,
    checkpoint: Path | None = None,
    write_pte: bool = False,
    recipe: Recipe = Recipe(),
    npu: NpuTarget | None = None,
) -> JobReport:
    """Export, prepare, calibrate, convert and report; writes ``model.pt2``, ``report.json``
    and ``report.md`` into ``out_dir`` (nothing is written when it is None), and with
    ``write_pte`` the ExecuTorch XNNPACK program ``model.pte`` (checked against the
    converted graph; its op coverage goes into the report).

    Args:
        keep_float: qualified module names left in float.
        graph: an already exported graph (e.g. loaded from a .pt2); exported from
            ``inputs.model`` when None.
        search, objective, checkpoint: ESC's search settings (method "esc" only; default
            SearchConfig()), its objective (default output MSE) and checkpoint file.
        recipe: EscQuantizer's target ("reference" or "xnnpack", see esc_ao.annotators),
            the transforms applied to the exported graph before annotation and the
            residual stream's precision (esc_ao.recipe).
    """
    t0 = time.perf_counter()
    calibration = as_batches(inputs.calibration)
    heldout = as_batches(inputs.heldout or inputs.calibration[-1:])
    log.info("%s: %s", inputs.name, "using the given program" if graph is not None else "exporting (torch.export)")
    if npu is not None:  # Arm's quantizer exports the model itself
        log.info("Arm's quantizer for %s, observe: %d calibration batch(es)", npu.accelerator, len(calibration))
        ready = _prepare_npu(graph if graph is not None else inputs.model, calibration, config, keep_float, npu)
    else:
        gm = graph if graph is not None else export_model(inputs.model, calibration[0])
        log.info(
            "transforms, prepare and observe: %d calibration batch(es)%s",
            len(calibration),
            f", recipe {recipe.suffix}" if recipe.suffix else "",
        )
        ready = recipe.prepare(gm, calibration, config, keep_float)
    prepared, quantizer, transforms = ready.model, ready.quantizer, ready.transforms
    esc: CalibrationResult | None = None
    if config.method == "esc":
        log.info("ESC search: local step, then CMA-ES")
        esc = calibrate(prepared, calibration, objective, search or SearchConfig(), checkpoint)
    t_calib = time.perf_counter() - t0
    log.info("measuring per-layer and output SQNR on %d held-out batch(es)", len(heldout))
    records = quantizer.records() if quantizer is not None else []
    per_layer = layer_sqnr(prepared, heldout[:1], [r.node for r in records if r.quantized])
    # Read the observers before convert_pt2e replaces them with quantize/dequantize ops.
    activations, size = observer_stats(prepared), weight_bytes(prepared)
    converted = convert(prepared)
    report = JobReport(
        model=inputs.name,
        config=config,
        recipe=recipe,
        transforms=list(transforms),
        precision_plan=ready.plan,
        keep_float=list(keep_float),
        calibration_batches=len(calibration),
        heldout_batches=len(heldout),
        output_sqnr_db=output_sqnr(inputs.model, converted, heldout),
        task=(
            {"float": inputs.task_metric(inputs.model), "quantized": inputs.task_metric(converted)}
            if inputs.task_metric is not None
            else None
        ),
        calibration_seconds=round(t_calib, 2),
        layers=[LayerRow(r.node, r.op, r.module, r.quantized, r.reason, per_layer.get(r.node)) for r in records],
        activations=list(activations),
        size=size,
        notes=inputs.notes,
        esc=esc,
        npu=npu,
    )
    if out_dir is not None:
        with staged_dir(Path(out_dir)) as stage:  # every output, or (on a failure) none
            report.size["program_file_bytes"] = save_program(converted, calibration[0], stage / "model.pt2")
            if write_pte and npu is not None:
                report.ethosu = _lower_npu(converted, heldout[0], stage, Path(out_dir), npu, inputs.model, graph)
            elif write_pte:
                from esc_ao.lower import to_executorch

                log.info("lowering to ExecuTorch XNNPACK (model.pte) and checking it")
                lowered = to_executorch(
                    converted,
                    heldout[0],
                    stage / "model.pte",
                    act_bits=config.act_bits,
                    reference=inputs.model if graph is None else None,
                )
                report.executorch = {
                    **lowered.as_dict(),
                    "path": str(Path(out_dir) / "model.pte"),
                    "summary": lowered.coverage.summary(),
                }
            if esc is not None and esc.history:
                plot_convergence(esc.history, esc.initial_objective, stage / "convergence.png")
            write_json_atomic(stage / "report.json", report.to_dict())
            write_text_atomic(stage / "report.md", render_markdown(report.to_dict()))
    report.total_seconds = round(time.perf_counter() - t0, 2)
    return report


def _prepare_npu(
    model: torch.nn.Module, calibration: list[Batch], config: QuantConfig, keep_float: Sequence[str], npu: NpuTarget
) -> Prepared:
    from esc_ao.lower.ethosu import prepare_ethosu

    if config.weight_bits != 8 or config.act_bits != 8:
        raise ValueError(
            f"{config.label} on {npu.accelerator}: Arm's quantizer makes int8 weights with int8 activations "
            "(or int16 ones with a16w8); use --weight-bits 8 --act-bits 8"
        )
    if keep_float:
        raise ValueError(f"keep_float on {npu.accelerator}: an NPU has no float; drop --keep-float")
    prepared = prepare_ethosu(model, calibration[0], npu.accelerator, npu.a16w8)
    observe(prepared, calibration)
    return Prepared(prepared, None, [], None)


def _lower_npu(
    converted: GraphModule,
    example: Batch,
    stage: Path,
    out_dir: Path,
    npu: NpuTarget,
    model: torch.nn.Module,
    graph: GraphModule | None,
) -> dict[str, Any]:
    """Lowers into ``stage/ethosu`` and re-estimates every delegate on the sweep's sizes;
    paths in the result name where the files end up (``out_dir``)."""
    from esc_ao.lower.ethosu import lower_ethosu, vela_sweep

    log.info("lowering to Ethos-U (%s): TOSA, Vela, the TOSA reference model", npu.accelerator)
    result = lower_ethosu(
        converted, example, stage / "ethosu", npu.accelerator, reference=model if graph is None else None
    )
    sweep = [
        {"delegate": d.index, **row}
        for d in result.delegates
        for row in vela_sweep(Path(d.tosa), npu.sweep, stage / "ethosu" / "sweep" / f"delegate{d.index}")
    ]
    text = json.dumps({**result.as_dict(), "summary": result.summary(), "a16w8": npu.a16w8, "sweep": sweep})
    return dict(json.loads(text.replace(str(stage), str(out_dir))))
