"""What both training recipes share: seeding, length-bucketed batches, the learning-rate
schedule, SpecAugment, a log that goes to the console and a file, and resumable state."""

from __future__ import annotations

import argparse
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
        yield items[i : i + size]


class Run:
    """The epoch bookkeeping both recipes share: state resumed from ``work/state.pt``, the
    best epoch by held-out error (``error_name`` in the history), and the stop rules
    (patience after ``min_epochs``, the time budget, ``max_epochs``)."""

    def __init__(
        self,
        work: Path,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        gen: torch.Generator,
        log: Log,
        args: Any,
        error_name: str,
    ) -> None:
        self.path, self.model, self.opt, self.gen, self.log, self.args = work / "state.pt", model, opt, gen, log, args
        self.error_name = error_name
        self.epoch, self.step, self.best, self.best_state, self.history, self.spent = 0, 0, float("inf"), None, [], 0.0
        self.stopped = False
        if self.path.exists():
            st = torch.load(self.path, weights_only=True)  # data only, as every file esc-ao reads
            model.load_state_dict(st["model"]), opt.load_state_dict(st["opt"]), gen.set_state(st["gen"])
            self.epoch, self.step, self.best, self.best_state, self.history, self.spent = (
                st[k] for k in ("epoch", "step", "best", "best_state", "history", "spent")
            )
            log("resumed", epoch=self.epoch, best=self.best)
        self.start = time.perf_counter() - self.spent

    def update(self, loss: torch.Tensor, losses: list[float], warmup: int, total_steps: int) -> None:
        """One optimiser step at the schedule's learning rate, gradients clipped at norm 5."""
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, self.args.lr, warmup, total_steps)
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self.opt.step()
        losses.append(float(loss.detach()))
        self.step += 1

    @property
    def running(self) -> bool:
        return not self.stopped and self.epoch < self.args.max_epochs

    def end_epoch(self, losses: list[float], error: float, t_epoch: float) -> None:
        self.epoch += 1
        self.history.append(
            {
                "epoch": self.epoch,
                "loss": round(sum(losses) / len(losses), 4),
                self.error_name: round(error, 4),
                "epoch_seconds": round(time.perf_counter() - t_epoch, 1),
            }
        )
        if error < self.best:
            self.best, self.best_state = error, {k: v.clone() for k, v in self.model.state_dict().items()}
        self.log("epoch", **self.history[-1], **{f"best_{self.error_name}": round(self.best, 4)})
        self.spent = time.perf_counter() - self.start
        save_state(
            self.path,
            model=self.model.state_dict(),
            opt=self.opt.state_dict(),
            gen=self.gen.get_state(),
            epoch=self.epoch,
            step=self.step,
            best=self.best,
            best_state=self.best_state,
            history=self.history,
            spent=self.spent,
        )
        since_best = self.epoch - min(h["epoch"] for h in self.history if h[self.error_name] == round(self.best, 4))
        if since_best >= self.args.patience and self.epoch >= self.args.min_epochs:
            self.log(f"stop: held-out {self.error_name} has not improved", epochs_since_best=since_best)
            self.stopped = True
        elif self.spent / 60 > self.args.max_minutes:
            self.log("stop: time budget spent", minutes=round(self.spent / 60, 1))
            self.stopped = True

    def best_model(self) -> torch.nn.Module:
        self.model.load_state_dict(self.best_state)
        return self.model

    def summary(self, recipe: str, corpus_fingerprint: str) -> dict[str, Any]:
        return {
            "recipe": recipe,
            "seed": self.args.seed,
            "epochs": self.epoch,
            f"best_{self.error_name}": self.best,
            "train_minutes": round(self.spent / 60, 1),
            "history": self.history,
            "corpus": corpus_fingerprint,
            "params": sum(p.numel() for p in self.model.parameters()),
        }


def parser(
    name: str, model: str, *, max_minutes: float, max_epochs: int, min_epochs: int, lr: float
) -> argparse.ArgumentParser:
    """The arguments both recipes take; ``name`` names the work folder and the log."""
    from esc_ao.speech.pretrained import checkpoint_path

    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-minutes", type=float, default=max_minutes, help="training-time budget (resumes count)")
    ap.add_argument("--max-epochs", type=int, default=max_epochs, help="also the length of the cosine schedule")
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--min-epochs", type=int, default=min_epochs, help="no early stop before this epoch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--work", type=Path, default=root / ".work" / name)
    ap.add_argument("--out", type=Path, default=checkpoint_path(model))
    ap.add_argument(
        "--log", type=Path, default=root / "docs" / "results" / "training" / f"{name.removeprefix('train_')}.log"
    )
    return ap


def start(args: argparse.Namespace) -> tuple[torch.Generator, Log]:
    """Threads, seeds, the work folder and the log of a recipe run."""
    torch.set_num_threads(args.threads)
    gen = seed_everything(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    return gen, Log(args.log)
