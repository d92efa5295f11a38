"""Whisper encoders on a CUDA GPU: float (fp32, bf16) against the int8 programs that
``esc_ao.lower.cuda`` makes, side by side in one run.

For each model and batch size it times, with CUDA events (median of ``--iters`` runs after
``--warmup``):

- ``fp32 eager`` (TF32 off) and ``fp32 compiled``, ``bf16 compiled`` (``torch.compile``):
  what a GPU user runs without esc-ao;
- ``int8 linears``: EscQuantizer's XNNPACK target (linears and convolutions int8, the rest
  float), lowered by ``compile_for_cuda``;
- ``int8 full``: the reference target with a 16-bit residual stream (every op on an
  integer grid), lowered the same way.

The int8 rows also give their output's SQNR against the float encoder and against the
converted reference graph on CPU. The arithmetic is the same, but GPU float ops round
differently and a value on a rounding boundary lands one integer step away, so the two
differ by 20-40 dB through a whole encoder; what shows that the GPU path computes what the
accuracy benchmark measured is that its SQNR against float equals the reference's.

Weights: ``--weights DIR`` holds ``<model>_encoder.pt`` state dicts (fp16) written here by
``--save-weights DIR`` from the packaged checkpoints; a model without one runs with seeded
random weights (timings do not depend on weight values; its SQNRs then describe a random
encoder). Inputs are the bundled clips' log-mel features.

    python examples/cuda_speed.py --out docs/results/cuda_speed --weights DIR
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.export import Dim
from torch.fx import GraphModule
from whisper.model import AudioEncoder

from esc_ao import QuantConfig, convert, export_model
from esc_ao.atomic import atomic_path
from esc_ao.lower.cuda import compile_for_cuda
from esc_ao.recipe import split_method
from esc_ao.report import tensor_sqnr_db
from esc_ao.speech.audio import bundled_clips
from esc_ao.speech.whisper import WhisperEncoder, whisper_mel

# (n_state, n_head, n_layer) of Whisper's audio encoders; n_mels 80, 1500 output frames.
ENCODERS = {"tiny.en": (384, 6, 4), "base": (512, 8, 6)}
# The best static W8A8 recipes of the accuracy benchmark (docs/results/accuracy.md) for
# each target: linears/convs int8 with a float residual stream, and full integer.
INT8_RECIPES = {"int8 linears": "mse+xnn+rf+sq", "int8 full": "mse+r16+gptq"}


def build_encoder(name: str, weights: Path | None) -> tuple[WhisperEncoder, str]:
    state, heads, layers = ENCODERS[name]
    torch.manual_seed(0)
    encoder = AudioEncoder(80, 1500, state, heads, layers)
    path = weights / f"{name}_encoder.pt" if weights else None
    if path is not None and path.exists():
        encoder.load_state_dict({k: v.float() for k, v in torch.load(path).items()})
        source = "pretrained"
    else:
        source = "random (seed 0)"
    return WhisperEncoder(encoder).eval(), source


def save_weights(out: Path) -> None:
    """The packaged Whisper checkpoints' encoders, fp16, for a machine without the packages."""
    from esc_ao.speech import load_whisper

    out.mkdir(parents=True, exist_ok=True)
    for name in ENCODERS:
        state = {k: v.half() for k, v in load_whisper(name).encoder.state_dict().items()}
        with atomic_path(out / f"{name}_encoder.pt") as tmp:
            torch.save(state, tmp)


@functools.cache
def _mels(split: str) -> list[torch.Tensor]:
    return [whisper_mel(c.audio) for c in bundled_clips(split)]


def mel_batches(batch: int) -> tuple[list[tuple[torch.Tensor]], torch.Tensor]:
    """Four calibration batches from the calibration clips, one evaluation batch from the
    held-out ones (clips repeated to fill a batch)."""
    mels = {split: _mels(split) for split in ("calibration", "heldout")}

    def stack(items: list[torch.Tensor], start: int) -> torch.Tensor:
        return torch.cat([items[(start + i) % len(items)] for i in range(batch)])

    calib = [(stack(mels["calibration"], i * batch),) for i in range(4)]
    return calib, stack(mels["heldout"], 0)


def cuda_ms(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def quantize(encoder: torch.nn.Module, recipe_name: str) -> GraphModule:
    """The converted encoder, exported with a dynamic batch (calibrated on batches of 2:
    torch.export specialises a batch of 1)."""
    calib, example = mel_batches(2)
    method, recipe = split_method(recipe_name)
    batch = {0: Dim("batch", min=1, max=64)}
    gm = export_model(encoder, (example,), dynamic_shapes=(batch,))
    return convert(recipe.prepare(gm, calib, recipe.configure(QuantConfig(method=method))).model)


def measure(name: str, batches: list[int], args: argparse.Namespace, emit: Callable[[dict], None]) -> None:
    encoder, source = build_encoder(name, args.weights)
    _, x_check = mel_batches(max(batches))
    with torch.no_grad():
        want_float = encoder(x_check)
    converted: dict[str, tuple[GraphModule, float, torch.Tensor]] = {}
    for recipe_name in INT8_RECIPES.values():
        t0 = time.perf_counter()
        gm = quantize(copy.deepcopy(encoder), recipe_name)  # the transforms rewrite weights in place
        with torch.no_grad():
            converted[recipe_name] = (gm, time.perf_counter() - t0, gm(x_check))
    gpu = encoder.cuda()
    bf16 = copy.deepcopy(gpu).to(torch.bfloat16)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    compiled = {
        "fp32 compiled": torch.compile(gpu, mode=args.mode, dynamic=False),
        "bf16 compiled": torch.compile(bf16, mode=args.mode, dynamic=False),
    }
    extra: dict[str, dict[str, Any]] = {}
    for variant, recipe_name in INT8_RECIPES.items():
        gm, quantize_s, want_ref = converted[recipe_name]
        program, lowering = compile_for_cuda(gm, mode=args.mode)
        compiled[f"{variant} ({recipe_name})"] = program
        extra[f"{variant} ({recipe_name})"] = {
            "quantize_s": quantize_s,
            "int8_gemms": lowering.replaced,
            "left_float": sorted(set(lowering.skipped.values())),
            "reference_sqnr_vs_float_db": tensor_sqnr_db(want_float, want_ref),
            "_reference": want_ref,
        }
    for batch in batches:
        x = x_check[:batch].cuda()
        emit(
            {
                "model": f"whisper-{name}",
                "weights": source,
                "batch": batch,
                "variant": "fp32 eager",
                "ms": cuda_ms(lambda: gpu(x), args.warmup, args.iters),
            }
        )
        for variant, program in compiled.items():
            xin = x.to(torch.bfloat16) if variant.startswith("bf16") else x
            row: dict[str, Any] = {"model": f"whisper-{name}", "weights": source, "batch": batch, "variant": variant}
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    out = program(xin).float().cpu()
                row["first_call_s"] = time.perf_counter() - t0
                row["ms"] = cuda_ms(lambda: program(xin), args.warmup, args.iters)
            except Exception as exc:  # one variant failing to compile must not lose the others' rows
                emit({**row, "ms": None, "error": f"{type(exc).__name__}: {str(exc)[:400]}".replace("|", "/")})
                continue
            row["sqnr_vs_float_db"] = tensor_sqnr_db(want_float[:batch], out)
            info = dict(extra.get(variant, {}))
            reference = info.pop("_reference", None)
            if reference is not None:
                info["sqnr_vs_reference_db"] = tensor_sqnr_db(reference[:batch], out)
            emit({**row, **info})


def render(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Whisper encoders on CUDA: float against esc-ao's int8 GEMM path",
        "",
        f"Device: {meta['device']}; torch {meta['torch']} (CUDA {meta['cuda']}); torch.compile mode "
        f"`{meta['mode']}`; median of {meta['iters']} runs after {meta['warmup']} warm-ups, CUDA events.",
        "",
        f"Command: `{meta['command']}`",
        "",
        "| model | weights | batch | variant | ms | vs fp32 eager | vs bf16 compiled | SQNR vs float dB "
        "| SQNR vs reference dB | reference vs float dB | int8 GEMMs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        key = (r["model"], r["batch"])
        same = {x["variant"]: x["ms"] for x in rows if (x["model"], x["batch"]) == key}

        def ratio(variant: str) -> str:
            return f"{same[variant] / r['ms']:.2f}x" if same.get(variant) and r["ms"] else "-"

        def db(field: str) -> str:
            v = r.get(field)
            return "-" if v is None else ("inf" if math.isinf(v) else f"{v:.1f}")

        lines.append(
            f"| {r['model']} | {r['weights']} | {r['batch']} | {r['variant']} "
            f"| {'failed: ' + r['error'] if r.get('error') else format(r['ms'], '.3f')} | {ratio('fp32 eager')} "
            f"| {ratio('bf16 compiled')} | {db('sqnr_vs_float_db')} | {db('sqnr_vs_reference_db')} "
            f"| {db('reference_sqnr_vs_float_db')} "
            f"| {r.get('int8_gemms', '-')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/cuda_speed"), help="writes OUT.json and OUT.md")
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--save-weights", type=Path, default=None, help="write the encoders' weights there and stop")
    parser.add_argument("--models", default=",".join(ENCODERS))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--mode", default="default", help="torch.compile mode for every compiled row")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args(argv)
    if args.save_weights is not None:
        save_weights(args.save_weights)
        return
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark times GPU kernels (use --save-weights on a CPU machine)")
    models = args.models.split(",")
    unknown = [m for m in models if m not in ENCODERS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; use some of {', '.join(ENCODERS)}")
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": platform.processor() or platform.machine(),
        "mode": args.mode,
        "warmup": args.warmup,
        "iters": args.iters,
        "command": "python examples/cuda_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    rows: list[dict] = []

    def emit(r: dict) -> None:
        rows.append(r)
        print(json.dumps(r), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(args.out.with_suffix(".json")) as tmp:
            Path(tmp).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        with atomic_path(args.out.with_suffix(".md")) as tmp:
            Path(tmp).write_text(render(rows, meta))

    for name in models:
        measure(name, [int(b) for b in args.batches.split(",")], args, emit)


if __name__ == "__main__":
    main()
