"""Seeded augmentation of synthetic speech: speed, pitch, gain and additive noise.

TTS voices are clean and perfectly regular; these perturbations give the models (and the
calibration data) the level and rate variety and background noise of recorded speech.
Every draw comes from the ``numpy.random.Generator`` passed in, so one seed gives one
result. The chosen settings are returned for the manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torchaudio.functional as AF

from esc_ao.corpus.voices import SAMPLE_RATE

__all__ = ["Augmentation", "apply", "draw", "noise", "pitch_shift", "place", "trim_silence"]

SPEEDS = (0.9, 1.0, 1.1)
PITCH_STEPS = (-2, -1, 0, 1, 2)  # semitones
# 2^(n/12) as small fractions: resampling by a ratio of small integers is fast, where
# torchaudio's pitch_shift resamples by 2^(n/12) exactly and takes seconds per clip.
_PITCH_RATIOS = {-2: (8, 9), -1: (17, 18), 1: (18, 17), 2: (9, 8)}
SNRS_DB = (None, 30.0, 20.0, 10.0, 5.0)  # None: no noise
NOISE_COLOURS = ("white", "pink", "brown", "hum")


@dataclass(frozen=True)
class Augmentation:
    speed: float = 1.0
    pitch_steps: int = 0
    gain_db: float = 0.0
    snr_db: float | None = None
    noise: str = "white"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def draw(rng: np.random.Generator, p_clean: float = 0.25) -> Augmentation:
    """A random augmentation; with probability ``p_clean`` none at all."""
    if rng.random() < p_clean:
        return Augmentation()
    return Augmentation(
        speed=float(SPEEDS[int(rng.integers(len(SPEEDS)))]),
        pitch_steps=int(PITCH_STEPS[int(rng.integers(len(PITCH_STEPS)))]),
        gain_db=round(float(rng.uniform(-12.0, 3.0)), 2),
        snr_db=SNRS_DB[int(rng.integers(len(SNRS_DB)))],
        noise=NOISE_COLOURS[int(rng.integers(len(NOISE_COLOURS)))],
    )


def noise(rng: np.random.Generator, n: int, colour: str) -> np.ndarray:
    """Unit-RMS noise: white, pink (1/f), brown (1/f^2) or mains hum with harmonics."""
    if colour == "hum":
        t = np.arange(n) / SAMPLE_RATE
        f0 = 50.0 if rng.random() < 0.5 else 60.0
        x = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 2 * np.pi)) / k for k in (1, 2, 3, 5))
        x = x + 0.1 * rng.standard_normal(n)
    else:
        spectrum = np.fft.rfft(rng.standard_normal(n))
        f = np.fft.rfftfreq(n)
        f[0] = f[1] if n > 1 else 1.0
        power = {"white": 0.0, "pink": 0.5, "brown": 1.0}[colour]
        x = np.fft.irfft(spectrum / f**power, n)
    x = np.asarray(x, dtype=np.float64)
    return (x / (np.sqrt(np.mean(x**2)) + 1e-12)).astype(np.float32)


def apply(audio: np.ndarray, aug: Augmentation, rng: np.random.Generator, length: int | None = None) -> np.ndarray:
    """Speed (resampling: tempo and pitch together), pitch shift (tempo kept), gain, then,
    with ``length``, placement at a random offset in a window of that many samples (cut
    around the centre when longer), then noise at ``aug.snr_db`` relative to the speech's
    RMS. Peaks are limited to 0.99."""
    x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    if aug.speed != 1.0:
        # Playing 16 kHz audio resampled to 16k/speed at 16 kHz: speed x faster.
        x = AF.resample(x, int(round(SAMPLE_RATE * aug.speed)), SAMPLE_RATE)
    if aug.pitch_steps:
        x = pitch_shift(x, aug.pitch_steps)
    y = x.numpy().astype(np.float32) * np.float32(10 ** (aug.gain_db / 20))
    if length is not None:
        y = place(y, length, rng)
    if aug.snr_db is not None:
        rms = float(np.sqrt(np.mean(y**2))) + 1e-8
        y = y + noise(rng, len(y), aug.noise) * np.float32(rms / 10 ** (aug.snr_db / 20))
    peak = float(np.max(np.abs(y))) if len(y) else 0.0
    return (y * (0.99 / peak) if peak > 0.99 else y).astype(np.float32)


def pitch_shift(x: torch.Tensor, steps: int, n_fft: int = 512, hop: int = 128) -> torch.Tensor:
    """Pitch up by ``steps`` semitones, duration kept: phase-vocoder time stretch by the
    pitch ratio a/b, then resampling by b/a back to the original length."""
    a, b = _PITCH_RATIOS[steps]
    window = torch.hann_window(n_fft)
    spec = torch.stft(x, n_fft, hop, window=window, return_complex=True)
    advance = torch.linspace(0, torch.pi * hop, spec.shape[-2])[..., None]
    stretched = AF.phase_vocoder(spec, b / a, advance)  # rate < 1 when a > b: longer
    y = torch.istft(stretched, n_fft, hop, window=window, length=int(round(len(x) * a / b)))
    y = AF.resample(y, a, b)[: len(x)]
    return torch.nn.functional.pad(y, (0, len(x) - len(y)))


def place(audio: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """``audio`` at a random offset in ``length`` zeros; the centre ``length`` samples when longer."""
    if len(audio) >= length:
        start = (len(audio) - length) // 2
        return audio[start : start + length].copy()
    out = np.zeros(length, dtype=np.float32)
    offset = int(rng.integers(length - len(audio) + 1))
    out[offset : offset + len(audio)] = audio
    return out


def trim_silence(audio: np.ndarray, threshold_db: float = -40.0, margin_s: float = 0.05) -> np.ndarray:
    """Cuts leading and trailing stretches quieter than ``threshold_db`` below the peak
    (20 ms frames), keeping ``margin_s`` either side: TTS engines pad unevenly."""
    frame = SAMPLE_RATE // 50
    n = len(audio) // frame
    if n == 0:
        return audio
    energy = np.sqrt(np.mean(audio[: n * frame].reshape(n, frame) ** 2, axis=1))
    loud = np.flatnonzero(energy > energy.max() * 10 ** (threshold_db / 20))
    margin = int(margin_s * SAMPLE_RATE)
    start = max(0, loud[0] * frame - margin)
    end = min(len(audio), (loud[-1] + 1) * frame + margin)
    return audio[start:end]
