"""What ESC's search costs and buys on the main job's model: search variants side by side.

    esc-ao bench search [--variants NAME:FIELD=VALUE,...] [--test-utterances 100]

Whisper tiny.en's encoder prepared as the main job prepares it (W8A8, XNNPACK target, its
default recipe, the 12 bundled calibration clips, ESC's observers); then, one after the
other on the same observers, each search variant (``SearchConfig`` fields, e.g.
``staged:stages=8,stage_budget=4,subsample=2,budget=0``). Per variant: wall time of
``calibrate`` (local step included), evaluations, the objective on the calibration clips,
and on real speech the search never saw (the first utterances of the real-speech test
split): the encoder output's noise-to-signal ratio against float and the greedy WER with
the float decoder. Also the cost of one evaluation: one full simulated forward per clip,
and each stage's share. Writes ``search_cost.json`` / ``.md``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.fx import GraphModule

from esc_ao.atomic import write_json_atomic, write_text_atomic
from esc_ao.bench.machine import describe
from esc_ao.config import QuantConfig, SearchConfig
from esc_ao.observers import observer_mode
from esc_ao.pipeline import Batch, as_batches, export_model

__all__ = ["DEFAULT_VARIANTS", "parse_variant", "run_search_bench"]

DEFAULT_VARIANTS = (
    "local:budget=0",
    "flat:budget=8",
    "staged:stages=8,stage_budget=8,budget=0",
    "default:stages=8,stage_budget=4,subsample=3,budget=0",
)


def parse_variant(spec: str, base: SearchConfig) -> tuple[str, SearchConfig]:
    """``NAME:FIELD=VALUE,...`` -> (name, ``base`` with those SearchConfig fields)."""
    name, _, fields = spec.partition(":")
    if not name:
        raise ValueError(f"variant {spec!r}: give NAME:FIELD=VALUE,..., e.g. staged:stages=8,budget=0")
    known = {f.name: f for f in dataclasses.fields(SearchConfig)}
    changes: dict[str, Any] = {}
    for item in filter(None, fields.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise ValueError(
                f"variant {spec!r}: {item!r} is not FIELD=VALUE with a SearchConfig field "
                f"({', '.join(sorted(k for k in known if k not in ('progress', 'dist_timeout_s')))})"
            )
        changes[key] = None if value == "None" else type(getattr(base, key) or 0)(value)
    return name, dataclasses.replace(base, **changes)


class _FakeQuantEncoder(torch.nn.Module):
    """The prepared graph with every observer simulating its quantizer: what the converted
    encoder computes (same op order), without converting."""

    def __init__(self, prepared: GraphModule) -> None:
        super().__init__()
        self.prepared = prepared

    def forward(self, mel: torch.Tensor) -> Any:
        with observer_mode(self.prepared, observing=False, fake_quant=True):
            return self.prepared(mel)


def _evaluation_seconds(prepared: GraphModule, batches: list[Batch]) -> float:
    """Seconds of one evaluation (the simulated forward over every calibration clip)."""
    t0 = time.perf_counter()
    with torch.no_grad(), observer_mode(prepared, observing=False, fake_quant=True):
        for b in batches:
            prepared(*b)
    return time.perf_counter() - t0


def _stage_shares(prepared: GraphModule, batches: list[Batch], n_stages: int) -> list[dict[str, Any]]:
    """Each stage's nodes, scales and seconds per clip (stages of esc_ao.search.staged)."""
    from esc_ao.search.distributed import cluster_from_env
    from esc_ao.search.objectives import OutputMSE
    from esc_ao.search.space import find_scale_dims
    from esc_ao.search.staged import StagedSearch, plan_stages

    dims = find_scale_dims(prepared)
    stages = plan_stages(prepared, dims, n_stages)
    with torch.no_grad(), observer_mode(prepared, observing=False, fake_quant=False):
        refs = [prepared(*b) for b in batches]
    search = StagedSearch(prepared, dims, stages, batches, OutputMSE(), refs, cluster_from_env(60))
    rows = []
    for k, stage in enumerate(stages):
        t0 = time.perf_counter()
        search.stage_value(k, [dims[i].observer.scale for i in stage.dims], range(len(batches)))
        rows.append(
            {
                "stage": k + 1,
                "nodes": len(stage.nodes),
                "scales": len(stage.dims),
                "ends_at": stage.boundary.name if stage.boundary is not None else "output",
                "seconds_per_clip": (time.perf_counter() - t0) / len(batches),
            }
        )
        search.advance(k)
    return rows


def _heldout(
    whisper: torch.nn.Module, encoder: torch.nn.Module, utts: Sequence[Any], floats: list[torch.Tensor]
) -> tuple[float, float]:
    """(WER, encoder output noise-to-signal ratio vs float) on real utterances, greedy
    decoding with the float decoder."""
    from esc_ao.bench.whisper_task import encoder_transcripts
    from esc_ao.metrics import wer

    outs: list[torch.Tensor] = []

    class Recording(torch.nn.Module):
        def forward(self, mel: torch.Tensor) -> Any:
            out = encoder(mel)
            outs.append(out)
            return out

    clips = [(torch.from_numpy(u.audio()), u.meta["duration_s"]) for u in utts]
    hyps = encoder_transcripts(whisper, Recording(), clips)
    noise = sum(float((q - f).pow(2).sum()) for q, f in zip(outs, floats))
    signal = sum(float(f.pow(2).sum()) for f in floats)
    return wer([u.text for u in utts], hyps, seed=0).value, noise / signal


def run_search_bench(
    out_dir: Path, variants: Sequence[str], n_test: int, base: SearchConfig, n_stages_profile: int = 8
) -> list[dict[str, Any]]:
    from esc_ao.bench.tasks import load_eval_corpus
    from esc_ao.job import whisper_default
    from esc_ao.recipe import main_job_recipe
    from esc_ao.search.calibrate import calibrate
    from esc_ao.speech import load_whisper_tiny_en, whisper_mel

    parsed = [parse_variant(v, base) for v in variants]
    inputs = whisper_default()
    calibration = as_batches(inputs.calibration)
    prepared = (
        main_job_recipe()
        .prepare(export_model(inputs.model, calibration[0]), calibration, QuantConfig(method="esc"), ())
        .model
    )
    whisper = load_whisper_tiny_en().eval()
    utts = load_eval_corpus("whisper-tiny.en", "real").utterances("test")[:n_test]
    with torch.no_grad():
        floats = [inputs.model(whisper_mel(torch.from_numpy(u.audio()))) for u in utts]
    float_wer, _ = _heldout(whisper, inputs.model, utts, floats)
    cost = {
        "evaluation_seconds": round(_evaluation_seconds(prepared, calibration), 2),
        "clips": len(calibration),
        "stages": _stage_shares(prepared, calibration, n_stages_profile),
    }
    print(cost, flush=True)
    rows: list[dict[str, Any]] = []
    for name, config in parsed:
        t0 = time.perf_counter()
        result = calibrate(prepared, calibration, config=config)
        seconds = time.perf_counter() - t0
        test_wer, test_nsr = _heldout(whisper, _FakeQuantEncoder(prepared), utts, floats)
        rows.append(
            {
                "variant": name,
                "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("progress",)},
                "seconds": round(seconds, 1),
                "evaluations": result.evaluations,
                "objective_start": result.initial_objective,
                "objective_final": result.final_objective,
                "test_nsr": test_nsr,
                "test_sqnr_db": -10 * math.log10(test_nsr) if test_nsr > 0 else math.inf,
                "test_wer": test_wer,
                "message": result.message,
            }
        )
        print(rows[-1], flush=True)
    meta = {
        "machine": describe(),
        "torch": torch.__version__,
        "test_utterances": len(utts),
        "float_wer": float_wer,
        "cost": cost,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "search_cost.json", {"meta": meta, "rows": rows})
    write_text_atomic(out_dir / "search_cost.md", _markdown(meta, rows, variants, n_test))
    return rows


def _markdown(meta: dict[str, Any], rows: list[dict[str, Any]], variants: Sequence[str], n_test: int) -> str:
    cost = meta["cost"]
    lines = [
        "# ESC's search on the main job's model: cost and result per search variant",
        "",
        f"Command: `esc-ao bench search --test-utterances {n_test} --variants {' '.join(variants)}`; "
        f"{meta['machine']}. Whisper tiny.en's encoder, W8A8, XNNPACK target, the main "
        f"job's recipe, {cost['clips']} bundled calibration clips. Test: the first {meta['test_utterances']} "
        f"utterances of the real-speech test split, greedy decoding with the float decoder (float WER "
        f"{100 * meta['float_wer']:.2f} %); SQNR of the encoder's output against float.",
        "",
        f"One evaluation (a simulated forward of every calibration clip): {cost['evaluation_seconds']:.1f} s. "
        "A stage of the staged search costs its share:",
        "",
        "| stage | nodes | scales | ends at | s per clip |",
        "|---|---|---|---|---|",
        *(
            f"| {s['stage']} | {s['nodes']} | {s['scales']} | {s['ends_at']} | {s['seconds_per_clip']:.3f} |"
            for s in cost["stages"]
        ),
        "",
        "| variant | settings | wall s | evaluations | objective start -> final | test SQNR dB | test WER % |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["config"]
        settings = (
            (f"{c['stages']} stages x {c['stage_budget']} gen, " if c["stages"] > 1 else "")
            + f"flat {c['budget']} gen, pop {c['popsize']}"
            + (f", {c['subsample']} clips/gen" if c["subsample"] else "")
        )
        lines.append(
            f"| {r['variant']} | {settings} | {r['seconds']:.0f} | {r['evaluations']} | "
            f"{r['objective_start']:.5g} -> {r['objective_final']:.5g} | {r['test_sqnr_db']:.2f} | "
            f"{100 * r['test_wer']:.2f} |"
        )
    return "\n".join(lines) + "\n"
