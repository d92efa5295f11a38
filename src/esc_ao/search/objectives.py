"""Calibration objectives: what ESC's global search minimises.

An objective sees, per calibration batch, the quantized model's output and the float
model's output (computed once and cached by ``calibrate``) and returns one float; lower is
better. Label-free objectives compare against the float model; task objectives take labels
or a decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

__all__ = [
    "Accuracy",
    "CTCLoss",
    "CrossEntropy",
    "DecodedWER",
    "LogitKL",
    "Objective",
    "OutputMSE",
    "first_tensor",
    "objective_by_name",
    "objective_parts",
    "output_tensors",
]


class Objective(Protocol):
    """``objective(outputs, references) -> float``; one entry per calibration batch."""

    def __call__(self, outputs: Sequence[Any], references: Sequence[Any]) -> float: ...


def first_tensor(out: Any) -> torch.Tensor:
    """The model's primary output (the first tensor of a tuple/list/dict output)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return first_tensor(out[0])
    if isinstance(out, dict) and out:
        return first_tensor(next(iter(out.values())))
    raise TypeError(f"model output of type {type(out).__name__} holds no tensor")


def output_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor of a model output (any pytree: nested tuples, lists, dicts), in order."""
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


@dataclass(frozen=True)
class OutputMSE:
    """Noise-to-signal ratio of the outputs, pooled over batches: sum (q - f)^2 / sum f^2.
    Its -10 log10 is the output SQNR, so minimising it maximises SQNR. ``all_outputs``:
    pool every output tensor (a model returning several, like Whisper's audio graph with
    each decoder block's keys and values) instead of the first one only."""

    all_outputs: bool = False

    def parts(self, outputs: Sequence[Any], references: Sequence[Any]) -> tuple[float, float]:
        pick = output_tensors if self.all_outputs else (lambda out: [first_tensor(out)])
        noise = signal = 0.0
        for o, r in zip(outputs, references):
            for a, b in zip(pick(o), pick(r)):
                a, b = a.float(), b.float()
                noise += float((a - b).pow(2).sum())
                signal += float(b.pow(2).sum())
        return noise, signal

    def __call__(self, outputs: Sequence[Any], references: Sequence[Any]) -> float:
        noise, signal = self.parts(outputs, references)
        return noise / max(signal, 1e-30)


@dataclass(frozen=True)
class LogitKL:
    """Mean KL(float || quantized) of the softmax over ``dim`` (classifier or token logits)."""

    dim: int = -1

    def parts(self, outputs: Sequence[Any], references: Sequence[Any]) -> tuple[float, float]:
        total = count = 0.0
        for o, r in zip(outputs, references):
            logp_q = F.log_softmax(first_tensor(o).float(), dim=self.dim)
            logp_f = F.log_softmax(first_tensor(r).float(), dim=self.dim)
            kl = (logp_f.exp() * (logp_f - logp_q)).sum(dim=self.dim)
            total += float(kl.sum())
            count += kl.numel()
        return total, count

    def __call__(self, outputs: Sequence[Any], references: Sequence[Any]) -> float:
        total, count = self.parts(outputs, references)
        return total / max(count, 1.0)


@dataclass(frozen=True)
class CTCLoss:
    """CTC loss of log-probabilities (B, T, C) against per-batch label sequences.

    Args:
        targets: one (B, S) padded label tensor per calibration batch.
        target_lengths: one (B,) tensor per batch.
        blank: the blank index.
    """

    targets: Sequence[torch.Tensor]
    target_lengths: Sequence[torch.Tensor]
    blank: int = 0

    def __call__(self, outputs: Sequence[Any], references: Sequence[Any]) -> float:
        if len(self.targets) != len(outputs):
            raise ValueError(f"CTCLoss has targets for {len(self.targets)} batches, got {len(outputs)} outputs")
        losses = []
        for out, tgt, tlen in zip(outputs, self.targets, self.target_lengths):
            logp = F.log_softmax(first_tensor(out).float(), dim=-1)  # (B, T, C)
            in_len = torch.full((logp.shape[0],), logp.shape[1], dtype=torch.long)
            losses.append(
                float(F.ctc_loss(logp.transpose(0, 1), tgt, in_len, tlen, blank=self.blank, zero_infinity=True))
            )
        return sum(losses) / len(losses)


@dataclass(frozen=True)
class CrossEntropy:
    """Cross-entropy of logits (B, C) against one (B,) label tensor per batch."""

    labels: Sequence[torch.Tensor]

    def __call__(self, outputs: Sequence[Any], references: Sequence[Any]) -> float:
        losses = [float(F.cross_entropy(first_tensor(o).float(), y)) for o, y in zip(outputs, self.labels)]
        return sum(losses) / max(len(losses), 1)


@dataclass(frozen=True)
class Accuracy:
    """1 - accuracy of argmax predictions against one (B,) label tensor per batch."""

    labels: Sequence[torch.Tensor]

    def __call__(self, outputs: Sequence[Any], references: Sequence[Any]) -> float:
        right = total = 0
        for o, y in zip(outputs, self.labels):
            right += int((first_tensor(o).argmax(dim=-1) == y).sum())
            total += y.numel()
        return 1.0 - right / max(total, 1)


@dataclass(frozen=True)
class DecodedWER:
    """Word error rate (jiwer) of ``decode(output)`` transcripts against references.

    Args:
        decode: maps one batch's model output to a list of transcripts.
        transcripts: the reference transcripts, one list per batch.
    """

    decode: Callable[[Any], list[str]]
    transcripts: Sequence[Sequence[str]]

    def __call__(self, outputs: Sequence[Any], references: Sequence[Any]) -> float:
        import jiwer

        hyps = [h for out in outputs for h in self.decode(out)]
        refs = [t for batch in self.transcripts for t in batch]
        if len(hyps) != len(refs):
            raise ValueError(f"decoder gave {len(hyps)} transcripts for {len(refs)} references")
        return float(jiwer.wer(refs, hyps))


def objective_parts(objective: Objective, outputs: Sequence[Any], references: Sequence[Any]) -> tuple[float, float]:
    """(numerator, denominator) whose sums over shards give the objective of the whole set:
    exact for objectives with a ``parts`` method (OutputMSE, LogitKL); for any other
    callable, its value weighted by the number of batches (exact for per-batch means)."""
    parts = getattr(objective, "parts", None)
    if parts is not None:
        num, den = parts(outputs, references)
        return float(num), float(den)
    return float(objective(outputs, references)) * len(outputs), float(len(outputs))


_LABEL_FREE: dict[str, Callable[[], Objective]] = {"mse": OutputMSE, "kl": LogitKL}


def objective_by_name(name: str) -> Objective:
    """A label-free objective by name: 'mse' (output noise-to-signal) or 'kl' (logits)."""
    if name not in _LABEL_FREE:
        raise ValueError(
            f"objective={name!r} is unknown: use one of {', '.join(_LABEL_FREE)} "
            "(or pass an Objective callable to esc_ao.calibrate)"
        )
    return _LABEL_FREE[name]()
