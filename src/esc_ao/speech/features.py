"""Kaldi filterbank features (torchaudio) with train-set normalisation, and the CTC alphabet.

The features are computed outside the exported graph (as a deployed model receives them
from the platform's front end); the graph starts at normalised fbank frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchaudio.compliance.kaldi as kaldi

__all__ = ["CTC_ALPHABET", "FbankNorm", "ctc_decode", "ctc_encode", "fbank"]

# Index 0 is the CTC blank; then space, apostrophe and a-z.
CTC_ALPHABET = "_ '" + "abcdefghijklmnopqrstuvwxyz"
_FLOOR_NATS = 8.0 * 2.302585  # 80 dB in natural-log power units


def fbank(audio: np.ndarray | torch.Tensor, n_mels: int, frames: int | None = None) -> torch.Tensor:
    """(samples,) 16 kHz audio in [-1, 1] -> (frames, n_mels) log-mel fbank (25 ms window,
    10 ms shift, no dither so the same audio gives the same features). With ``frames``,
    zero-padded or cut to that many frames (AST's fixed input)."""
    wav = torch.as_tensor(audio, dtype=torch.float32).reshape(1, -1) * 32768.0
    feats = kaldi.fbank(
        wav,
        num_mel_bins=n_mels,
        dither=0.0,
        frame_length=25.0,
        frame_shift=10.0,
        sample_frequency=16000.0,
        energy_floor=0.0,
    )
    # An 80 dB floor below the loudest bin (Whisper's choice): without dither, digital
    # silence (TTS padding, band-limited voices) sits at log(float eps) = -15.9, 40 dB
    # under any real noise floor, and that gap, not the speech, dominated the features'
    # variance (measured: a CNN stayed near chance on the keywords until it was floored).
    feats = torch.maximum(feats, feats.max() - _FLOOR_NATS)
    if frames is not None:
        feats = feats[:frames]
        feats = torch.nn.functional.pad(feats, (0, 0, 0, frames - feats.shape[0]), value=float(feats.min()))
    return feats


@dataclass(frozen=True)
class FbankNorm:
    """Per-bin mean and standard deviation of the training set's fbank frames."""

    mean: torch.Tensor
    std: torch.Tensor

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.mean) / self.std

    @staticmethod
    def fit(frames: list[torch.Tensor]) -> "FbankNorm":
        x = torch.cat(frames)
        return FbankNorm(x.mean(0), x.std(0).clamp_min(1e-3))


def ctc_encode(text: str) -> list[int]:
    """Text -> label indices; characters outside the alphabet are dropped."""
    return [CTC_ALPHABET.index(c) for c in text.lower() if c in CTC_ALPHABET[1:]]


def ctc_decode(logits: torch.Tensor) -> str:
    """Greedy CTC decoding of (T, C) logits: argmax, merge repeats, drop blanks."""
    best = logits.argmax(-1).tolist()
    out, prev = [], 0
    for i in best:
        if i != prev and i != 0 and i < len(CTC_ALPHABET):
            out.append(CTC_ALPHABET[i])
        prev = i
    return " ".join("".join(out).split())
