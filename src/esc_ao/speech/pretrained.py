"""The benchmark's trained models, shipped with esc-ao, and their input pipelines.

Checkpoints live in ``esc_ao/data/models`` and are written by the recipes in
``examples/`` (``train_conformer_ctc.py``, ``train_ast.py``). A checkpoint holds the model
constructor's arguments, the weights (float16 on disk to halve the repository's size; the
float model IS these weights in float32), the fbank normalisation of the training set, the
output labels and the training summary (held-out metrics, epochs, wall time).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from esc_ao.atomic import atomic_path
from esc_ao.speech.ast import AST
from esc_ao.speech.conformer import ConformerCTC
from esc_ao.speech.features import FbankNorm, fbank

__all__ = ["CHECKPOINTS", "TrainedModel", "checkpoint_path", "load_trained", "save_checkpoint"]

CHECKPOINTS = {"conformer-ctc": "conformer_ctc.pt", "ast": "ast.pt"}
_CLASSES: dict[str, type[nn.Module]] = {"conformer-ctc": ConformerCTC, "ast": AST}


@dataclass
class TrainedModel:
    """A trained model in eval mode and what turns audio into its input."""

    name: str
    model: nn.Module
    n_mels: int
    frames: int | None  # fixed input length (AST) or None (any length)
    norm: FbankNorm
    labels: list[str]
    summary: dict[str, Any]

    def features(self, audio: np.ndarray) -> torch.Tensor:
        """(samples,) audio -> (1, frames, n_mels) normalised fbank: the model's input."""
        return self.norm(fbank(audio, self.n_mels, self.frames)).unsqueeze(0)


def checkpoint_path(name: str) -> Path:
    if name not in CHECKPOINTS:
        raise ValueError(f"model {name!r} has no checkpoint: use one of {', '.join(CHECKPOINTS)}")
    root = Path(os.environ.get("ESC_AO_MODELS", str(resources.files("esc_ao") / "data" / "models")))
    return root / CHECKPOINTS[name]


def save_checkpoint(
    path: Path,
    name: str,
    model: nn.Module,
    config: dict[str, Any],
    n_mels: int,
    frames: int | None,
    norm: FbankNorm,
    labels: list[str],
    summary: dict[str, Any],
) -> None:
    """Writes a checkpoint atomically; weights stored as float16."""
    state = {k: v.detach().to(torch.float16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    payload = {
        "name": name,
        "config": config,
        "state_dict": state,
        "n_mels": n_mels,
        "frames": frames,
        "norm_mean": norm.mean,
        "norm_std": norm.std,
        "labels": labels,
        "summary": summary,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_trained(name: str, path: Path | None = None, for_export: bool = True) -> TrainedModel:
    """The trained model ``name`` ("conformer-ctc" or "ast") in float32, eval mode. With
    ``for_export`` the Conformer's attention is the delegate-friendly SplitHeadAttention."""
    path = path or checkpoint_path(name)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no checkpoint for {name!r}; train it with " f"examples/train_{name.replace('-', '_')}.py"
        )
    ck = torch.load(path, map_location="cpu", weights_only=True)  # data only: a checkpoint cannot run code
    build: Callable[..., nn.Module] = _CLASSES[name]
    config = dict(ck["config"])
    if name == "conformer-ctc":
        config["split_attention"] = False
    model = build(**config)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ck["state_dict"].items()})
    model.eval()
    if name == "conformer-ctc" and for_export:
        model.split_attention_()  # type: ignore[operator]
    return TrainedModel(
        name,
        model,
        ck["n_mels"],
        ck["frames"],
        FbankNorm(ck["norm_mean"], ck["norm_std"]),
        list(ck["labels"]),
        dict(ck["summary"]),
    )
