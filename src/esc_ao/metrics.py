"""Task metrics of the speech benchmark: WER (jiwer, after Whisper's English text
normaliser) and accuracy, each with a seeded bootstrap / Wilson confidence interval, so a
quantization loss can be told from noise.

WER is the corpus WER: total edits / total reference words (what jiwer returns for
lists), not a mean of per-utterance rates. Its interval resamples utterances (the unit
the test set is drawn in), with a seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["Estimate", "accuracy", "normalize_english", "wer"]


@dataclass(frozen=True)
class Estimate:
    """A metric with its 95 % confidence interval and the sample size behind it."""

    value: float
    low: float
    high: float
    n: int
    # What the figure is made of, for inspection (e.g. WER's error counts, transcripts);
    # not part of the comparison.
    details: dict[str, Any] = field(default_factory=dict, compare=False)

    def as_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "ci95_low": self.low, "ci95_high": self.high, "n": self.n}


@lru_cache(maxsize=1)
def _normalizer() -> Callable[[str], str]:
    from whisper.normalizers import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize_english(text: str) -> str:
    """Whisper's English normaliser (case, punctuation, spelling, numbers), spaces squeezed."""
    return " ".join(_normalizer()(text).split())


def _edits(ref: str, hyp: str) -> tuple[int, int, int, int]:
    """(substitutions, deletions, insertions, reference words)."""
    import jiwer

    out = jiwer.process_words(ref, hyp)
    return out.substitutions, out.deletions, out.insertions, out.substitutions + out.deletions + out.hits


def wer(
    references: Sequence[str],
    hypotheses: Sequence[str],
    *,
    normalize: bool = True,
    seed: int = 0,
    resamples: int = 1000,
) -> Estimate:
    """Corpus WER of ``hypotheses`` against ``references`` with a bootstrap 95 % interval.

    Raises:
        ValueError: different lengths, or no reference words at all (WER undefined).
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses: one per utterance")
    if normalize:
        references = [normalize_english(r) for r in references]
        hypotheses = [normalize_english(h) for h in hypotheses]
    empty = [i for i, r in enumerate(references) if not r.split()]
    if len(empty) == len(references):
        raise ValueError("every reference is empty (after normalisation): WER is undefined")
    if empty:
        raise ValueError(f"references {empty[:5]} are empty (after normalisation); drop them, WER needs words")
    counts = np.array([_edits(r, h) for r, h in zip(references, hypotheses)], dtype=np.float64)
    pairs = np.stack([counts[:, :3].sum(axis=1), counts[:, 3]], axis=1)  # (errors, reference words)
    value = float(pairs[:, 0].sum() / pairs[:, 1].sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(pairs), size=(resamples, len(pairs)))
    boot = pairs[idx, 0].sum(axis=1) / pairs[idx, 1].sum(axis=1)
    low, high = np.quantile(boot, [0.025, 0.975])
    totals = counts.sum(axis=0).astype(int).tolist()
    details = dict(zip(("substitutions", "deletions", "insertions", "reference_words"), totals))
    return Estimate(value, float(min(low, value)), float(max(high, value)), len(pairs), details)


def accuracy(correct: Sequence[bool]) -> Estimate:
    """Fraction correct with the Wilson score 95 % interval (sound at 0 and 1, unlike the
    normal approximation)."""
    n = len(correct)
    if n == 0:
        raise ValueError("accuracy of zero predictions is undefined: pass at least one")
    p, z = sum(bool(c) for c in correct) / n, 1.959963984540054
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At p = 0 or 1 the bounds equal p analytically; clamp away float rounding.
    return Estimate(p, max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)), n)
