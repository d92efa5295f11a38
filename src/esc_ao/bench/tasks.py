"""The accuracy benchmark's tasks: a float model, its calibration batches, the task
objective ESC minimises, and the test-split metric of any forward function.

- ``conformer-ctc``: trained Conformer-CTC on the ``asr`` corpus; WER (greedy CTC).
- ``ast``: trained AST on the ``kws`` corpus; accuracy over 37 classes.
- ``whisper-tiny.en``: see esc_ao.bench.whisper_task.

Calibration batches are a seeded sample of the corpus's calibration split (never trained
on; 100 utterances by default, the paper's count). ESC's objective is the task's own
training loss against the reference labels of those utterances (CTC for ASR,
cross-entropy for classification): the paper's "task error against reference targets",
in a form smooth enough for CMA-ES to rank candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from esc_ao.corpus import Utterance, load_corpus
from esc_ao.metrics import Estimate, accuracy, wer
from esc_ao.objectives import CrossEntropy, CTCLoss, Objective
from esc_ao.pipeline import Batch

__all__ = ["Part", "Task", "build_task", "calibration_sample", "single_part"]

Forward = Callable[..., Any]
# ESC's objective on the Conformer scores this many of the calibration utterances (one
# utterance per batch: their lengths differ and the graph has no padding mask). All of
# them would cost ~10 s per candidate on 2 cores; observers see every utterance.
SEARCH_UTTERANCES = 16


@dataclass
class Part:
    """One exported graph of a task. ``calibration`` and ``objective`` receive the
    converted (quantized) graphs of the parts before this one, so a later part is
    calibrated on what the quantized earlier parts feed it. ``search_batches``: ESC's
    objective uses only the first N calibration batches (None: all); the observers always
    see all of them."""

    name: str
    model: nn.Module
    calibration: Callable[[dict[str, Forward]], list[Batch]]
    objective: Callable[[dict[str, Forward]], Objective]
    dynamic_shapes: Any = None
    search_batches: int | None = None


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


def single_part(name: str, metric: str, model: nn.Module, batches: list[Batch], objective: Objective,
                evaluate: Callable[[Forward], Estimate], notes: dict[str, Any], dynamic_shapes: Any = None) -> Task:
    part = Part("model", model, lambda _: batches, lambda _: objective, dynamic_shapes)
    return Task(name, metric, [part], lambda f: evaluate(f["model"]), sum(p.numel() for p in model.parameters()),
                notes)


def calibration_sample(utts: list[Utterance], n: int, seed: int) -> list[Utterance]:
    """``n`` utterances drawn without replacement (seeded) from the calibration split."""
    if not 1 <= n <= len(utts):
        raise ValueError(f"n_calibration={n} must lie in 1..{len(utts)} (the calibration split's size)")
    pick = np.random.default_rng(seed).choice(len(utts), size=n, replace=False)
    return [utts[i] for i in sorted(pick)]


def _conformer(n_calibration: int, seed: int) -> Task:
    from esc_ao.speech.features import ctc_decode, ctc_encode
    from esc_ao.speech.pretrained import load_trained

    tm = load_trained("conformer-ctc")
    corpus = load_corpus("asr")
    calib = calibration_sample(corpus.utterances("calibration"), n_calibration, seed)
    batches = [(tm.features(u.audio()),) for u in calib]
    targets = [torch.tensor([ctc_encode(u.text)]) for u in calib[:SEARCH_UTTERANCES]]
    objective = CTCLoss(targets, [torch.tensor([len(t[0])]) for t in targets])
    test = corpus.utterances("test")
    test_feats = [tm.features(u.audio()) for u in test]

    def evaluate(forward: Forward) -> Estimate:
        with torch.no_grad():
            hyps = [ctc_decode(forward(x)[0]) for x in test_feats]
        return wer([u.text for u in test], hyps, seed=seed)

    frames = torch.export.Dim("frames", min=16, max=3000)
    task = single_part("conformer-ctc", "wer", tm.model, batches, objective, evaluate,
                       {"test_utterances": len(test), "search_utterances": SEARCH_UTTERANCES,
                        "training": _brief(tm.summary)}, dynamic_shapes=({1: frames},))
    task.parts[0].search_batches = SEARCH_UTTERANCES
    return task


def _ast(n_calibration: int, seed: int, batch: int = 25) -> Task:
    from esc_ao.speech.pretrained import load_trained

    tm = load_trained("ast")
    corpus = load_corpus("kws")
    calib = calibration_sample(corpus.utterances("calibration"), n_calibration, seed)
    feats = torch.cat([tm.features(u.audio()) for u in calib])
    ys = torch.tensor([tm.labels.index(u.label) for u in calib])
    batches = [(x,) for x in torch.split(feats, batch)]
    objective = CrossEntropy(list(torch.split(ys, batch)))
    test = corpus.utterances("test")
    x_test = torch.cat([tm.features(u.audio()) for u in test])
    y_test = torch.tensor([tm.labels.index(u.label) for u in test])

    def evaluate(forward: Forward) -> Estimate:
        preds = []
        with torch.no_grad():
            for x in torch.split(x_test, batch):
                n = x.shape[0]
                if n < batch:  # the graph has a static batch: pad with copies, drop their outputs
                    x = torch.cat([x, x[-1:].expand(batch - n, -1, -1)])
                preds.append(forward(x)[:n].argmax(-1))
        return accuracy((torch.cat(preds) == y_test).tolist())

    return single_part("ast", "accuracy", tm.model, batches, objective, evaluate,
                       {"test_clips": len(test), "batch": batch, "training": _brief(tm.summary)})


def _brief(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k != "history"}


_BUILDERS: dict[str, Callable[[int, int], Task]] = {"conformer-ctc": _conformer, "ast": _ast}


def build_task(name: str, n_calibration: int = 100, seed: int = 0) -> Task:
    """The task ``name``: 'whisper-tiny.en', 'conformer-ctc' or 'ast'."""
    if name == "whisper-tiny.en":
        from esc_ao.bench.whisper_task import whisper_task

        return whisper_task(n_calibration, seed)
    if name not in _BUILDERS:
        raise ValueError(f"model {name!r} is unknown: use one of whisper-tiny.en, {', '.join(_BUILDERS)}")
    return _BUILDERS[name](n_calibration, seed)
