"""Latency, size and peak memory of float vs integer ExecuTorch XNNPACK programs, and
where each program's time goes.

    esc-ao bench speed [--models conformer whisper-encoder ast] [--variants ...] [--runs 20] [--rounds 3]
                       [--threads 1 2]

For each model, every variant is lowered to a .pte (checked against its graph by
``to_executorch``), then all of them run in the native C++ runner on the same input,
interleaved round by round (so drift of the machine hits every variant alike), once per
thread count. Reported: median latency over all rounds (each round's median of ``runs``
runs) with the spread of the round medians, .pte size, the runner's peak resident memory,
the ratio to float at the same thread count, and the program's SQNR against the float
model (so a fast broken program never looks like a win). Then each program is profiled
operator by operator on one thread (esc_ao.bench.op_profile). Writes ``speed.json`` (one
record per model x variant x threads) and ``speed.md``.

Variants:
* ``float``: the float model, same graph rewrites (one delegate), fp32 XNNPACK kernels.
* ``int8``: EscQuantizer(target="xnnpack") W8A8 with MSE scales, static int8 kernels.
* ``int8-default``: what ``esc-ao quantize`` writes at W8A8 (esc_ao.recipe.main_job_recipe:
  smoothing, the residual stream float with the linears writing it as dynamic int8 GEMMs),
  MSE scales (ESC's search changes scales, not the program's ops or speed).
* ``int8-qk8`` / ``int8-att8``: ``int8-default`` with the attention scores matmul / both
  attention matmuls as XNNPACK's int8 batch matmul (recipe flags +qk8 / +att8).
* ``w4a4``: the ``int8`` program with 4-bit grids: weights in [-8, 7] and activations in
  [-8, 7], run by the int8 kernels (XNNPACK has no 4-bit activation type).
* ``w4-dyn``: int4 per-channel weights with dynamic int8 activations (XNNPACK qd8-qc4w
  linears, from the stock XNNPACKQuantizer's dynamic config); other ops float.
* ``8da8w`` / ``8da4w``: what ExecuTorch's own Whisper export does (optimum-executorch's
  ``--qlinear``): torchao's dynamic per-token int8 activations with int8 per-channel /
  int4 group-32 weights on every linear (esc_ao.bench.dynamic), the rest float.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from esc_ao.annotators import AttentionMatmuls
from esc_ao.atomic import write_json_atomic, write_text_atomic
from esc_ao.bench.machine import cpu_features, describe_cpu
from esc_ao.bench.op_profile import CATEGORIES, categorize, profile_pte
from esc_ao.lower.executorch import LoweringError

__all__ = ["MODELS", "VARIANTS", "render", "run_speed_bench"]

VARIANTS = ("float", "int8", "int8-default", "int8-qk8", "int8-att8", "w4a4", "w4-dyn", "8da8w", "8da4w")
# variant -> Recipe.attention
_ATTENTION: dict[str, AttentionMatmuls] = {"int8-default": "float", "int8-qk8": "scores", "int8-att8": "int8"}
_TORCHAO_DYNAMIC = {"8da8w": "w8a8", "8da4w": "w4a8"}  # variant -> esc_ao.bench.dynamic bits


def _conformer() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], list[tuple]]:
    from esc_ao.speech import ConformerCTC

    torch.manual_seed(0)
    model = ConformerCTC().eval()  # 8.4M parameters, 16 layers, d=144
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(1, 1000, 80, generator=g),) for _ in range(2)]  # 10 s at 10 ms hop
    return model, batches[0], batches


def _whisper() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], list[tuple]]:
    from esc_ao.job import whisper_default

    inputs = whisper_default(2)
    return inputs.model, inputs.calibration[0], inputs.calibration


def _whisper_base() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], list[tuple]]:
    from esc_ao.speech import WhisperEncoder, bundled_clips, load_whisper, whisper_mel

    batches = [(whisper_mel(c.audio),) for c in bundled_clips("calibration")[:2]]
    return WhisperEncoder(load_whisper("base")).eval(), batches[0], batches


def _ast() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], list[tuple]]:
    from esc_ao.speech import AST

    torch.manual_seed(0)
    model = AST().eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(1, 100, 128, generator=g),) for _ in range(2)]
    return model, batches[0], batches


def _linear_stack() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], list[tuple]]:
    # The Conformer's FFN GEMMs alone (16 x 144->576->144 on 250 frames): what the int8
    # GEMM kernels gain over fp32 on this CPU bounds what any whole model can gain.
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(16):
        layers += [torch.nn.Linear(144, 576), torch.nn.ReLU(), torch.nn.Linear(576, 144), torch.nn.ReLU()]
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(1, 250, 144, generator=g),) for _ in range(2)]
    return torch.nn.Sequential(*layers).eval(), batches[0], batches


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, tuple[torch.Tensor, ...], list[tuple]]]] = {
    "conformer": _conformer,
    "whisper-encoder": _whisper,
    "whisper-base-encoder": _whisper_base,
    "ast": _ast,
    "linear-stack": _linear_stack,
}
DESCRIPTION = {
    "conformer": "Conformer-CTC, 8.4M params (16 layers, d=144), 10 s of audio (1000 fbank frames), random weights",
    "whisper-encoder": "Whisper tiny.en encoder (real weights), 30 s window (3000 mel frames)",
    "whisper-base-encoder": "Whisper base encoder (real weights, 6 layers, d=512), 30 s window (3000 mel frames)",
    "ast": "AST, 5.4M params (12 layers, d=192), 1 s of audio (100 x 128 fbank), random weights",
    "linear-stack": "GEMMs only: 16 x (Linear 144->576, ReLU, Linear 576->144, ReLU) on 250 frames, the "
    "Conformer's FFN shapes; the bound on what integer kernels gain on this CPU",
}


def _quantized(model: torch.nn.Module, batches: list[tuple], variant: str) -> torch.nn.Module:
    from esc_ao import EscQuantizer, QuantConfig, convert, export_model, observe, prepare

    if variant in _TORCHAO_DYNAMIC:
        from esc_ao.bench.dynamic import quantize_linears

        return quantize_linears(copy.deepcopy(model), _TORCHAO_DYNAMIC[variant])
    if variant in _ATTENTION:
        from esc_ao.recipe import main_job_recipe

        config = QuantConfig(weight_bits=8, act_bits=8, method="mse")
        recipe = dataclasses.replace(main_job_recipe("xnnpack", 8), attention=_ATTENTION[variant])
        return convert(recipe.prepare(export_model(model, batches[0]), batches, config).model)
    if variant == "w4-dyn":
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )

        quantizer = XNNPACKQuantizer().set_global(
            get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True, weight_qmin=-8, weight_qmax=7)
        )
    else:
        bits = 8 if variant == "int8" else 4
        quantizer = EscQuantizer(QuantConfig(weight_bits=bits, act_bits=bits, method="mse"), target="xnnpack")
    prepared = prepare(export_model(model, batches[0]), quantizer)
    observe(prepared, batches)
    return convert(prepared)


def _lower(model: torch.nn.Module, example: tuple, batches: list[tuple], variant: str, path: Path) -> dict[str, Any]:
    from esc_ao.lower import to_executorch

    t0 = time.perf_counter()
    if variant == "float":
        result = to_executorch(model, example, path)
    else:
        result = to_executorch(_quantized(model, batches, variant), example, path, reference=model)
    # to_executorch already ran the program: against float directly for the float model,
    # and (given the reference) against float for the quantized ones.
    vs_float = result.sqnr_db if result.program_vs_float_db is None else result.program_vs_float_db
    return {
        "pte": str(path),
        "size_bytes": result.size_bytes,
        "prepare_and_lower_s": round(time.perf_counter() - t0, 1),
        "sqnr_vs_graph_db": round(result.sqnr_db, 2),
        "graph_vs_float_db": None if result.graph_vs_float_db is None else round(result.graph_vs_float_db, 2),
        "sqnr_vs_float_db": round(vs_float, 2),
        "coverage": result.coverage.as_dict(),
        "coverage_summary": result.coverage.summary(),
    }


def _lowered(model_fn: Callable, name: str, variants: list[str], work_dir: Path, reuse: bool) -> tuple[tuple, dict]:
    model, example, batches = model_fn()
    lowered: dict[str, dict[str, Any]] = {}
    for v in variants:
        pte, info = work_dir / f"{name}-{v}.pte", work_dir / f"{name}-{v}.json"
        if reuse and pte.is_file() and info.is_file():
            lowered[v] = json.loads(info.read_text())
        else:
            try:
                lowered[v] = _lower(model, example, batches, v, pte)
            except LoweringError as exc:  # recorded in the table, not fatal to the others
                print(f"{name} {v}: FAILED {exc}", flush=True)
                lowered[v] = {"error": str(exc).splitlines()[0][:300]}
                continue
            write_json_atomic(info, lowered[v])
        print(
            f"{name} {v}: {lowered[v]['coverage_summary']}; {lowered[v]['size_bytes'] / 1e6:.1f} MB, "
            f"{lowered[v]['prepare_and_lower_s']} s",
            flush=True,
        )
    return example, lowered


def run_speed_bench(
    models: list[str],
    variants: list[str],
    runs: int,
    rounds: int,
    out_dir: Path,
    work_dir: Path,
    reuse: bool = False,
    lower_only: bool = False,
    threads: Sequence[int] = (1, 2),
    profile_runs: int = 5,
) -> list[dict[str, Any]]:
    """Lowers (or with ``reuse``, reloads) every program, profiles each on one thread
    (``profile_runs`` 0: no profile), then times them all at each thread count; the
    profiles go with the rows of the first thread count.

    ``lower_only`` stops after lowering: timing is best done later on an idle machine
    with ``reuse``, since lowering is CPU-heavy and noisy neighbours skew latencies."""
    from esc_ao.lower.runner import runner_path

    for name in models:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; valid: {', '.join(VARIANTS)}")
    if not threads or min(threads) < 1:
        raise ValueError(f"threads={list(threads)}: give one or more thread counts >= 1, e.g. --threads 1 2")
    runner_path()  # fail before minutes of lowering, not after
    work_dir.mkdir(parents=True, exist_ok=True)
    prepared = {name: _lowered(MODELS[name], name, variants, work_dir, reuse) for name in models}
    if lower_only:
        return []
    rows: list[dict[str, Any]] = []
    for name, (example, lowered) in prepared.items():
        failed = {v: info for v, info in lowered.items() if "error" in info}
        rows += [{"model": name, "variant": v, "error": info["error"]} for v, info in failed.items()]
        ok = [v for v in variants if v not in failed]
        profiles = {v: _profile(lowered[v]["pte"], example, profile_runs) for v in ok} if profile_runs else {}
        for n in threads:
            rows += _timed(name, example, {v: lowered[v] for v in ok}, runs, rounds, n, profiles)
            profiles = {}  # one copy of each profile, with the first thread count's rows
    _write(rows, runs, rounds, out_dir)
    return rows


def _profile(pte: str, example: tuple, runs: int) -> dict[str, Any]:
    return profile_pte(pte, example, runs=runs, threads=1).as_dict()


def _timed(
    name: str,
    example: tuple,
    lowered: dict[str, dict[str, Any]],
    runs: int,
    rounds: int,
    threads: int,
    profiles: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """One row per variant: ``rounds`` rounds, each running every variant in turn."""
    from esc_ao.lower.runner import run_native

    medians: dict[str, list[float]] = {v: [] for v in lowered}
    rss: dict[str, int] = {}
    for _ in range(rounds):
        for v, info in lowered.items():
            run = run_native(info["pte"], example, runs=runs, warmup=3, threads=threads)
            medians[v].append(run.median_ms)
            rss[v] = max(rss.get(v, 0), run.peak_rss_bytes)
    base = statistics.median(medians["float"]) if "float" in medians else None
    rows = []
    for v in lowered:
        med = statistics.median(medians[v])
        row = {
            "model": name,
            "variant": v,
            "threads": threads,
            "median_ms": round(med, 2),
            "round_medians_ms": [round(m, 2) for m in medians[v]],
            "speedup_vs_float": round(base / med, 2) if base else None,
            "peak_rss_bytes": rss[v],
            **lowered[v],
        }
        if v in profiles:
            row["profile"] = profiles[v]
        rows.append(row)
        print(f"{name} {v} {threads}t: {med:.1f} ms (rounds {medians[v]}), x{row['speedup_vs_float']}", flush=True)
    return rows


def _merged(rows: list[dict[str, Any]], out_dir: Path) -> list[dict[str, Any]]:
    """``rows`` plus the rows of other models already in ``speed.json`` (each keeps the
    machine and settings it was measured with), so measuring one model keeps the others."""
    path = out_dir / "speed.json"
    if not path.exists():
        return rows
    previous = json.loads(path.read_text())
    legacy = previous.get("meta", {})  # rows written before each row carried its machine
    measured = {r["model"] for r in rows}
    kept = [
        {
            "machine": legacy.get("machine", "?"),
            "runs_per_round": legacy.get("runs_per_round"),
            "rounds": legacy.get("rounds"),
            **r,
        }
        for r in previous.get("rows", [])
        if r["model"] not in measured
    ]
    order = list(MODELS)
    return sorted(kept + rows, key=lambda r: order.index(r["model"]) if r["model"] in order else len(order))


def _write(rows: list[dict[str, Any]], runs: int, rounds: int, out_dir: Path) -> None:
    here = {"machine": describe_cpu(), "cpu_int8_features": cpu_features(), "runs_per_round": runs, "rounds": rounds}
    rows = _merged([{**here, **r} for r in rows], out_dir)
    meta = {
        "runner": "build/runner/esc_ao_runner (native C++, ExecuTorch 1.5.1 wheel, XNNPACK)",
        "torch": torch.__version__,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "speed.json", {"meta": meta, "rows": rows})
    render(out_dir)


def render(out_dir: Path) -> None:
    """Writes ``speed.md`` from ``speed.json`` in ``out_dir``."""
    saved = json.loads((out_dir / "speed.json").read_text())
    meta, rows = saved["meta"], saved["rows"]
    lines = [
        "# ExecuTorch XNNPACK speed: float vs integer programs",
        "",
        f"Command: `esc-ao bench speed --models MODEL --runs RUNS --rounds ROUNDS --threads 1 2` per model (each "
        f"section names its settings and machine); {meta['runner']}, its thread pool set to the row's thread count. "
        "Latency: median over rounds of each round's median, variants interleaved round by round; spread = "
        "min..max of the round medians; vs float: against the float program at the same thread count (a "
        "program slower than float is marked **slower**). Peak RSS: the runner process. Program vs float: "
        "the .pte's output against the float model's, in dB. int8 GEMMs gain over fp32 only on CPUs with int8 "
        "dot-product instructions (avx512_vnni, avx_vnni; Arm dotprod/i8mm), named in each section's machine: "
        "compare ratios within a section, not across machines.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        lines += _section(model, [r for r in rows if r["model"] == model])
    write_text_atomic(out_dir / "speed.md", "\n".join(lines))


def _ratio(r: dict[str, Any]) -> str:
    ratio = r.get("speedup_vs_float")
    if ratio is None:
        return "-"
    return f"{ratio}x" + (" **slower**" if ratio < 1.0 else "")


def _section(model: str, mrows: list[dict[str, Any]]) -> list[str]:
    first = mrows[0]
    threads = sorted({r["threads"] for r in mrows if "threads" in r})
    flag = f" --threads {' '.join(map(str, threads))}" if threads else ""
    lines = [
        f"## {model}",
        "",
        DESCRIPTION.get(model, ""),
        "",
        f"`esc-ao bench speed --models {model} --runs {first.get('runs_per_round')} --rounds "
        f"{first.get('rounds')}{flag}`; machine: {first.get('machine', '?')}.",
        "",
        "| variant | threads | median ms | spread ms | vs float | .pte MB | peak RSS MB | program vs float dB | "
        "graph vs float dB | where the ops run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in mrows:
        if "error" in r:
            lines.append(f"| {r['variant']} | - | lowering failed: {r['error']} ||||||||")
            continue
        spread = f"{min(r['round_medians_ms']):.1f}..{max(r['round_medians_ms']):.1f}"
        lines.append(
            f"| {r['variant']} | {r.get('threads', '?')} | {r['median_ms']:.1f} | {spread} | {_ratio(r)} | "
            f"{r['size_bytes'] / 1e6:.2f} | {r['peak_rss_bytes'] / 1e6:.0f} | {r['sqnr_vs_float_db']} | "
            f"{r.get('graph_vs_float_db') or '-'} | {r['coverage_summary']} |"
        )
    profiled = [r for r in mrows if "profile" in r]
    if profiled:
        lines += [
            "",
            "Where the time goes, 1 thread (XNNPACK's per-operator timings from an ETDump, median of the profiled "
            "runs; esc_ao.bench.op_profile): each category's share of the method's time; gemm = fully connected, "
            "convolution and batch matrix multiply; convert = quantize/dequantize inside the delegate; outside = "
            "time not in any XNNPACK operator.",
            "",
            "| variant | profiled ms | "
            + " | ".join(f"{c} %" for c in CATEGORIES)
            + " | largest operator kinds (ms) |",
            "|---|---|" + "---|" * len(CATEGORIES) + "---|",
        ]
        for r in profiled:
            p = r["profile"]
            total = p["total_ms"]
            cats = categorize(p["kinds_ms"], total)  # from the kinds: the categories' rules may be newer
            shares = " | ".join(f"{100 * cats[c] / total:.0f}" for c in CATEGORIES)
            top = "; ".join(f"{k} {v:.1f}" for k, v in list(p["kinds_ms"].items())[:4])
            lines.append(f"| {r['variant']} | {total:.1f} | {shares} | {top} |")
    lines.append("")
    return lines
