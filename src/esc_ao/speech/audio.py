"""Audio input: WAV reading (stdlib, no codec backend needed) and the bundled clips."""

from __future__ import annotations

import json
import wave
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

__all__ = ["Clip", "bundled_clips", "read_wav"]


@dataclass(frozen=True)
class Clip:
    """One bundled utterance."""

    name: str
    text: str
    voice: str
    split: str  # "calibration" or "heldout"
    audio: torch.Tensor  # (samples,), float32 in [-1, 1], 16 kHz


def read_wav(path: Path, expected_rate: int = 16000) -> torch.Tensor:
    """Mono 16-bit PCM WAV as a float32 tensor in [-1, 1].

    Raises:
        ValueError: another sample rate, channel count or sample width (convert with
            ``sox in.wav -r 16000 -c 1 -b 16 out.wav``).
    """
    with wave.open(str(path), "rb") as w:
        rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
        if (rate, channels, width) != (expected_rate, 1, 2):
            raise ValueError(
                f"{path}: {rate} Hz, {channels} channel(s), {8 * width}-bit; expected "
                f"{expected_rate} Hz mono 16-bit (sox in.wav -r {expected_rate} -c 1 -b 16 out.wav)"
            )
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return torch.from_numpy(pcm.astype(np.float32) / 32768.0)


def bundled_clips(split: str | None = None) -> list[Clip]:
    """The speech clips shipped with esc-ao (made with flite and espeak-ng; see
    scripts/make_clips.py), optionally only one split."""
    if split not in (None, "calibration", "heldout"):
        raise ValueError(f"split={split!r}: use 'calibration', 'heldout' or None for all")
    root = Path(str(resources.files("esc_ao") / "data" / "clips"))
    manifest = json.loads((root / "manifest.json").read_text())
    clips = [
        Clip(e["file"], e["text"], f"{e['engine']}/{e['voice']}", e["split"], read_wav(root / e["file"]))
        for e in manifest["clips"]
    ]
    return [c for c in clips if split is None or c.split == split]
