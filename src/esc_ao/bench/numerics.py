"""Declared numerics versions: what keys the accuracy benchmark's cells instead of the
bytes of the source files.

A cell (one model x method x bits x evaluation set) takes minutes to hours to compute, so
it must survive edits that do not change numbers (comments, renames, moved files,
refactors) and must not survive edits that do. Each part of the code that decides a cell's
numbers declares an integer version here; a change that moves numbers bumps its part's
version, which recomputes exactly the cells that part decides. What guards the
declaration: ``reference_figures(part)`` computes a few small figures that depend on that
part's code, ``tests/data/numerics_reference.json`` records them per version, and
``tests/test_numerics.py`` fails when they move while the version did not. After a
deliberate change: bump the version, then record with
``.venv/bin/python scripts/record_numerics.py``.

Parts and the code each one stands for:

- ``quantization``: observers, histogram, quantizer and annotators, graph preparation,
  the PT2E pipeline, quantization config defaults, the fast evaluation graph;
- ``search``: ESC's local step, search space and CMA-ES driver (ESC cells only);
- ``dynamic``: the dynamic-activation rows' quantization (bench/dynamic.py: torchao's
  config and what it is applied to); their cells are keyed by it instead of
  ``quantization``, whose observers and quantizer they do not use;
- ``recipes``: what a recipe suffix adds (esc_ao.recipe, esc_ao.transforms, the
  residual-stream precision of the quantizer); only cells of methods with a suffix;
- ``xnnpack``: what the XNNPACK target annotates differently from the reference target
  (outputs of integer ops, float attention matmuls, float graph outputs, dynamic int8
  GEMMs writing a float residual stream); only cells with the ``+xnn`` recipe flag;
- ``benchmark``: calibration sampling, hold-out split, metrics and their intervals,
  features, quantize_task (bench/accuracy.py, bench/tasks.py, metrics.py,
  speech/features.py);
- ``whisper``, ``conformer-ctc``, ``ast``: each model's task code (bench/*_task.py and
  the model's speech module); trained weights and weight packages are keyed by content or
  pinned version separately (esc_ao.bench.cells).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

__all__ = ["NUMERICS", "PARTS", "model_parts", "reference_figures"]

NUMERICS: dict[str, int] = {
    "quantization": 1,
    "search": 1,
    "dynamic": 1,
    "recipes": 1,
    "xnnpack": 1,
    "benchmark": 1,
    "whisper": 1,
    "conformer-ctc": 1,
    "ast": 1,
}
PARTS = tuple(NUMERICS)
_MODEL_PART = {"whisper-tiny.en": "whisper", "whisper-base": "whisper", "conformer-ctc": "conformer-ctc", "ast": "ast"}


def model_parts(model: str, method: str) -> dict[str, int]:
    """The parts (and their versions) that decide a cell of ``model`` with ``method``:
    the search only for ESC, ``dynamic`` instead of ``quantization`` for the dynamic rows,
    a model's own task part only for that model."""
    if model not in _MODEL_PART:
        raise ValueError(f"model {model!r} has no numerics part: use one of {', '.join(_MODEL_PART)}")
    base, _, flags = method.partition("+")
    names = ["dynamic" if base == "dynamic" else "quantization", "benchmark", _MODEL_PART[model]]
    names += ["search"] if base == "esc" else []
    names += ["recipes"] if flags else []
    names += ["xnnpack"] if "xnn" in flags.split("+") else []
    return {n: NUMERICS[n] for n in sorted(names)}


def _small_graph(method: str, bits: int):  # type: ignore[no-untyped-def]
    """A seeded one-layer Conformer prepared and observed: big enough to hold every
    annotated op kind (linear, conv, attention matmuls, residual adds, LayerNorm)."""
    import torch
    import torchaudio

    from esc_ao import EscQuantizer, QuantConfig, export_model, observe, prepare
    from esc_ao.speech import ExportableConformer

    torch.manual_seed(0)
    model = ExportableConformer(
        torchaudio.models.Conformer(input_dim=32, num_heads=2, ffn_dim=64, num_layers=1, depthwise_conv_kernel_size=7)
    ).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 40, 32, generator=gen), torch.tensor([40, 40])) for _ in range(3)]
    prepared = prepare(
        export_model(model, batches[0]), EscQuantizer(QuantConfig(weight_bits=bits, act_bits=bits, method=method))
    )
    observe(prepared, batches)
    return model, prepared, batches


def _sqnr(model: Any, converted: Any, batches: list) -> float:
    import torch

    from esc_ao.report import output_sqnr

    with torch.no_grad():
        return round(float(output_sqnr(model, converted, batches)), 4)


def _quantization() -> dict[str, Any]:
    from esc_ao import convert
    from esc_ao.eval_graph import for_evaluation

    figures: dict[str, Any] = {}
    for method in ("max", "percentile", "entropy", "mse", "esc"):
        for bits in (8, 4):
            model, prepared, batches = _small_graph(method, bits)
            figures[f"{method}-w{bits}a{bits}-sqnr_db"] = _sqnr(model, for_evaluation(convert(prepared)), batches)
    return figures


def _search() -> dict[str, Any]:
    from esc_ao import SearchConfig, calibrate, convert

    model, prepared, batches = _small_graph("esc", 4)
    result = calibrate(
        prepared, batches, config=SearchConfig(budget=3, popsize=6, seed=0, progress=False, local_grid=8)
    )
    last = result.history[-1]  # the search's own path, whether or not its result was kept
    return {
        "objective_start": round(result.initial_objective, 6),
        "objective_final": round(result.final_objective, 6),
        "last_generation": {k: round(float(last[k]), 6) for k in ("best", "mean", "sigma")},
        "scales": len(result.labels),
        "sqnr_db": _sqnr(model, convert(prepared), batches),
    }


def _dynamic() -> dict[str, Any]:
    """Output SQNR of torchao's dynamic quantization of a seeded one-layer Conformer (its
    linears: input widths multiples of 32) and of a small MLP (input width 48: int4 per
    channel at W4A8), and the sizes counted for the MLP."""
    import torch
    import torchaudio
    from torch import nn

    from esc_ao.bench.dynamic import dynamic_sizes, quantize_linears
    from esc_ao.bench.tasks import single_part
    from esc_ao.speech import ExportableConformer

    torch.manual_seed(0)
    conformer = ExportableConformer(
        torchaudio.models.Conformer(input_dim=32, num_heads=2, ffn_dim=64, num_layers=1, depthwise_conv_kernel_size=7),
        split_attention=True,
    ).eval()
    mlp = nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 8)).eval()
    gen = torch.Generator().manual_seed(1)
    conformer_batches = [(torch.randn(2, 40, 32, generator=gen),) for _ in range(3)]
    mlp_batches = [(torch.randn(2, 40, 48, generator=gen) + 0.5,) for _ in range(3)]
    figures: dict[str, Any] = {}
    for bits in ("w8a8", "w4a8"):
        figures[f"conformer-{bits}-sqnr_db"] = _sqnr(
            conformer, quantize_linears(copy.deepcopy(conformer), bits), conformer_batches
        )
        figures[f"mlp-{bits}-sqnr_db"] = _sqnr(mlp, quantize_linears(copy.deepcopy(mlp), bits), mlp_batches)
        # dynamic_sizes reads the task's model only: objective and evaluation are never called
        task = single_part("mlp", "accuracy", mlp, [], _not_called, _not_called, {})
        sizes = dynamic_sizes(task, bits)
        figures[f"mlp-{bits}-bytes"] = [sizes.float_bytes, sizes.quant_bytes, sizes.per_channel, sizes.per_group]
    return figures


def _not_called(*args: Any) -> Any:
    raise AssertionError("a placeholder of a task whose model alone is read")


def _stack_model():  # type: ignore[no-untyped-def]
    """A seeded pre-LayerNorm stack with an outlier channel in its residual stream (as
    Whisper's) and large LayerNorm gains, and three calibration batches."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln, self.fc1, self.fc2 = nn.LayerNorm(16), nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(x))))

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.blocks, self.ln = nn.Linear(8, 16), nn.Sequential(Block(), Block()), nn.LayerNorm(16)
            self.head = nn.Linear(16, 4)
            with torch.no_grad():
                self.embed.bias[0] = 300.0
                for ln in (self.blocks[0].ln, self.blocks[1].ln, self.ln):
                    assert isinstance(ln, nn.LayerNorm)
                    ln.weight[0], ln.weight[5] = 0.01, 25.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.ln(self.blocks(self.embed(x))))

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    return Stack().eval(), [(torch.randn(2, 10, 8, generator=gen),) for _ in range(3)]


def _recipe_figures(methods: list[tuple[str, Any]]) -> dict[str, Any]:
    """Output SQNR of the stack under each (method with recipe suffix, config), and what
    each transform did."""
    from esc_ao import convert, export_model
    from esc_ao.recipe import split_method

    model, batches = _stack_model()
    figures: dict[str, Any] = {}
    for method, config in methods:
        _, recipe = split_method(method)
        name = method if config.label == "w8a8" else f"{method}-{config.label}"
        ready = recipe.prepare(export_model(model, batches[0]), batches, config)
        figures[f"{name}-sqnr_db"] = _sqnr(model, convert(ready.model), batches)
        figures[f"{name}-transformed"] = [r.detail.split(";")[0] for r in ready.transforms if r.applied]
        if ready.plan is not None:
            figures[f"{name}-raised"] = list(ready.plan.modules)
    return figures


def _recipes() -> dict[str, Any]:
    """The reference-target recipes: W8A8 with and without the 16-bit stream and smoothing,
    W4A8 with and without GPTQ, W4A4 with and without a precision plan."""
    from esc_ao.config import QuantConfig

    w8, w4 = QuantConfig(method="mse"), QuantConfig(method="mse", weight_bits=4)
    w4a4 = QuantConfig(method="mse", weight_bits=4, act_bits=4)
    return _recipe_figures(
        [(m, w8) for m in ("mse", "mse+r16", "mse+sq", "mse+r16+sq")]
        + [(m, w4) for m in ("mse+r16+sq", "mse+r16+sq+gptq")]
        + [(m, w4a4) for m in ("mse+r16", "mse+r16+mp60")]
    )


def _xnnpack() -> dict[str, Any]:
    """The XNNPACK target's annotation, plain and with a float residual stream."""
    from esc_ao.config import QuantConfig

    return _recipe_figures([(m, QuantConfig(method="mse")) for m in ("mse+xnn", "mse+xnn+rf")])


def _benchmark() -> dict[str, Any]:
    from esc_ao.bench.tasks import calibration_sample, holdout_split
    from esc_ao.metrics import accuracy, wer
    from esc_ao.speech import bundled_clips
    from esc_ao.speech.features import fbank

    refs = ["turn the lights off", "seven two nine", "play some music please", "stop"]
    hyps = ["turn the light off", "seven to nine", "play some music please", "stop stop"]
    w = wer(refs, hyps, seed=0)
    a = accuracy([True, False, True, True, True])
    feats = fbank(bundled_clips()[0].audio, 80)
    return {
        "holdout_split_12": [list(half) for half in holdout_split(12)],
        "calibration_sample": calibration_sample(list(range(40)), 6, 0),
        "wer": [round(w.value, 6), round(w.low, 6), round(w.high, 6)],
        "accuracy": [round(a.value, 6), round(a.low, 6), round(a.high, 6)],
        "fbank_mean": round(float(feats.mean()), 4),
        "fbank_shape": list(feats.shape),
    }


def _whisper() -> dict[str, Any]:
    import torch

    from esc_ao.bench.whisper_task import greedy_transcribe, token_limit
    from esc_ao.speech import bundled_clips, load_whisper_tiny_en, whisper_mel
    from esc_ao.speech.whisper import WhisperAudio, WhisperTextStep

    torch.manual_seed(0)
    model = load_whisper_tiny_en().eval()
    clip = bundled_clips()[0]
    with torch.no_grad():
        tokens = greedy_transcribe(
            WhisperAudio(model).eval(),
            WhisperTextStep(model).eval(),
            whisper_mel(clip.audio),
            token_limit(len(clip.audio) / 16000),
        )[0]
    return {"tokens": tokens, "token_limit_3s": token_limit(3.0)}


def _trained(name: str) -> dict[str, Any]:
    import torch

    from esc_ao.speech import bundled_clips
    from esc_ao.speech.pretrained import load_trained

    trained = load_trained(name)
    with torch.no_grad():
        out = trained.model(trained.features(bundled_clips()[0].audio.numpy()))
    out = out[0] if isinstance(out, tuple) else out
    return {
        "output_mean": round(float(out.float().mean()), 4),
        "output_absmax": round(float(out.abs().max()), 4),
        "argmax": out.reshape(-1, out.shape[-1]).argmax(-1)[:16].tolist(),
    }


_FIGURES: dict[str, Callable[[], dict[str, Any]]] = {
    "quantization": _quantization,
    "search": _search,
    "dynamic": _dynamic,
    "recipes": _recipes,
    "xnnpack": _xnnpack,
    "benchmark": _benchmark,
    "whisper": _whisper,
    "conformer-ctc": lambda: _trained("conformer-ctc"),
    "ast": lambda: _trained("ast"),
}


def reference_figures(part: str) -> dict[str, Any]:
    """Small figures that move when ``part``'s numerics move (seconds each; Whisper's
    loads tiny.en)."""
    if part not in _FIGURES:
        raise ValueError(f"numerics part {part!r} is unknown: use one of {', '.join(PARTS)}")
    return _FIGURES[part]()
