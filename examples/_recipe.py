"""What both training recipes share: seeding, length-bucketed batches, the learning-rate
schedule, SpecAugment, a log that goes to the console and a file, and resumable state."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torchaudio.transforms as T


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def buckets(lengths: list[int], max_frames: int, gen: torch.Generator) -> list[list[int]]:
    """Indices grouped into batches of similar length with at most ``max_frames`` padded
    frames each, in a random order (seeded): little padding, every epoch different."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * lengths[i] > max_frames:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[p] for p in perm]


def pad(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([f.shape[0] for f in feats])
    out = torch.zeros(len(feats), int(lengths.max()), feats[0].shape[1])
    for i, f in enumerate(feats):
        out[i, : f.shape[0]] = f
    return out, lengths


class SpecAugment(torch.nn.Module):
    """Two frequency masks and two time masks (SpecAugment's LD policy, smaller)."""

    def __init__(self, freq: int, time: int) -> None:
        super().__init__()
        self.f, self.t = T.FrequencyMasking(freq), T.TimeMasking(time)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, F)
        x = x.transpose(1, 2)
        x = self.t(self.t(self.f(self.f(x))))
        return x.transpose(1, 2)


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to 5 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


class Log:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.t0 = path, time.perf_counter()

    def __call__(self, msg: str, **fields: Any) -> None:
        line = f"[{time.perf_counter() - self.t0:7.0f}s] {msg}" + (f" {json.dumps(fields)}" if fields else "")
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def save_state(path: Path, **state: Any) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def batches_of(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
