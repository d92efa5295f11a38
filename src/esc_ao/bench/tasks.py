"""The accuracy benchmark's tasks: a float model, its calibration batches, the task
objective ESC minimises, and the test-split metric of any forward function. One module per
model, so that the cells of one model are keyed by its own task code:

- ``conformer-ctc``: esc_ao.bench.conformer_task (WER, greedy CTC, ``asr`` corpus);
- ``ast``: esc_ao.bench.ast_task (accuracy over 37 classes, ``kws`` corpus);
- ``whisper-tiny.en``, ``whisper-base``: esc_ao.bench.whisper_task (WER, greedy decoding,
  ``asr`` corpus).

Calibration batches are a seeded sample of the corpus's calibration split (never trained
on; 100 utterances by default, the paper's count). ESC's objective is the task's own
training loss against the reference labels of those utterances (CTC for ASR,
cross-entropy for classification): the paper's "task error against reference targets",
in a form smooth enough for CMA-ES to rank candidates. Every fifth calibration batch is
held out of the search (``holdout_split``): CMA-ES's result is kept only if it beats its
start on those too (esc_ao.search.calibrate's held-out check); the observers see all batches.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
from torch import nn

from esc_ao.corpus import Corpus, load_corpus
from esc_ao.metrics import Estimate
from esc_ao.pipeline import Batch
from esc_ao.search.objectives import Objective

__all__ = [
    "HOLDOUT_EVERY",
    "MODEL_CORPUS",
    "Part",
    "Task",
    "build_task",
    "calibration_sample",
    "holdout_split",
    "load_eval_corpus",
    "single_part",
    "training_brief",
]

Forward = Callable[..., Any]
T = TypeVar("T")
# The TTS corpus each benchmark model is calibrated and tested on (its "tts" evaluation set).
MODEL_CORPUS = {"whisper-tiny.en": "asr", "whisper-base": "asr", "conformer-ctc": "asr", "ast": "kws"}
HOLDOUT_EVERY = 5  # every fifth calibration batch is held out of ESC's search


def holdout_split(n: int, every: int = HOLDOUT_EVERY) -> tuple[list[int], list[int]]:
    """Indices of ``n`` calibration batches -> (searched, held out): every ``every``-th is
    held out, so both halves spread over the (sorted, hence voice- or class-ordered) sample.
    Fewer than ``every`` batches: all searched, none held out."""
    held = list(range(every - 1, n, every))
    return [i for i in range(n) if i not in set(held)], held


@dataclass
class Part:
    """One exported graph of a task. ``calibration`` and ``objective`` receive the
    converted (quantized) graphs of the parts before this one, so a later part is
    calibrated on what the quantized earlier parts feed it; ``objective`` also receives the
    indices of the calibration batches it scores. ``search``/``holdout``: the batches
    ESC's search scores and those its held-out check scores (the observers see all
    batches). ``local_batches``: how many of the searched ones ESC's local step fits on."""

    name: str
    model: nn.Module
    calibration: Callable[[dict[str, Forward]], list[Batch]]
    objective: Callable[[dict[str, Forward], Sequence[int]], Objective]
    search: Sequence[int]
    holdout: Sequence[int] = ()
    dynamic_shapes: Any = None
    local_batches: int = 1


@dataclass
class Task:
    """A benchmark model: its parts (one graph each) and the test metric of a set of
    forward functions, one per part name (float modules or converted graphs)."""

    name: str
    metric: str  # "wer" (lower is better) or "accuracy"
    parts: list[Part]
    evaluate: Callable[[dict[str, Forward]], Estimate]
    n_params: int
    notes: dict[str, Any] = field(default_factory=dict)

    def float_forwards(self) -> dict[str, Forward]:
        return {p.name: p.model for p in self.parts}


def single_part(
    name: str,
    metric: str,
    model: nn.Module,
    batches: list[Batch],
    objective: Callable[[Sequence[int]], Objective],
    evaluate: Callable[[Forward], Estimate],
    notes: dict[str, Any],
    dynamic_shapes: Any = None,
    local_batches: int = 1,
) -> Task:
    """A one-graph task; ``objective(indices)`` scores the calibration batches at ``indices``
    and the batches are split by ``holdout_split``."""
    search, holdout = holdout_split(len(batches))
    part = Part(
        "model", model, lambda _: batches, lambda _, idx: objective(idx), search, holdout, dynamic_shapes, local_batches
    )
    return Task(
        name,
        metric,
        [part],
        lambda f: evaluate(f["model"]),
        sum(p.numel() for p in model.parameters()),
        {**notes, "search_batches": len(search), "holdout_batches": len(holdout)},
    )


def calibration_sample(utts: list[T], n: int, seed: int) -> list[T]:
    """``n`` utterances drawn without replacement (seeded) from the calibration split."""
    if not 1 <= n <= len(utts):
        raise ValueError(f"n_calibration={n} must lie in 1..{len(utts)} (the calibration split's size)")
    pick = np.random.default_rng(seed).choice(len(utts), size=n, replace=False)
    return [utts[i] for i in sorted(pick)]


def training_brief(summary: dict[str, Any]) -> dict[str, Any]:
    """A trained checkpoint's summary without its per-epoch history (for a cell's notes)."""
    return {k: v for k, v in summary.items() if k != "history"}


# model name -> (the module whose ``task(n_calibration, seed, eval_set, **kwargs)`` builds
# it, kwargs); imported on use: each pulls in its model's code
_TASK_MODULES: dict[str, tuple[str, dict[str, Any]]] = {
    "whisper-tiny.en": ("esc_ao.bench.whisper_task", {"model_name": "tiny.en"}),
    "whisper-base": ("esc_ao.bench.whisper_task", {"model_name": "base"}),
    "conformer-ctc": ("esc_ao.bench.conformer_task", {}),
    "ast": ("esc_ao.bench.ast_task", {}),
}


def load_eval_corpus(model: str, eval_set: str) -> Corpus:
    """The corpus ``model`` is calibrated and tested on for ``eval_set``: "real" (human
    recordings, esc_ao.corpus.real) or "tts" (the model's TTS corpus), built or verified."""
    if eval_set == "real":
        from esc_ao.corpus.real import load_real_corpus

        return load_real_corpus()
    if eval_set == "tts":
        return load_corpus(MODEL_CORPUS[model])
    raise ValueError(f"evaluation set {eval_set!r}: use 'real' or 'tts'")


def build_task(name: str, n_calibration: int = 100, seed: int = 0, eval_set: str = "tts") -> Task:
    """The task ``name`` ('whisper-tiny.en', 'whisper-base', 'conformer-ctc' or 'ast'),
    calibrated and tested on ``eval_set``."""
    if name not in _TASK_MODULES:
        raise ValueError(f"model {name!r} is unknown: use one of {', '.join(_TASK_MODULES)}")
    module, kwargs = _TASK_MODULES[name]
    return importlib.import_module(module).task(n_calibration, seed, eval_set=eval_set, **kwargs)
