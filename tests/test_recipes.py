"""The training recipes in examples/ run end to end (one short epoch on tiny corpora) and
write checkpoints that ``load_trained`` serves, with held-out metrics in the summary."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from esc_ao.corpus import CorpusSpec, Voice, load_corpus
from esc_ao.speech.pretrained import load_trained

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
VOICES = (Voice("flite", "kal16"), Voice("espeak-ng", "en-us"))
UNSEEN = (Voice("flite", "rms"),)


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(EXAMPLES))
    spec.loader.exec_module(module)
    return module


def _run(module, corpus, tmp_path: Path, monkeypatch, extra: list[str]) -> Path:
    monkeypatch.setattr(module, "load_corpus", lambda _name: corpus)
    out = tmp_path / "model.pt"
    argv = [
        "recipe",
        "--max-epochs",
        "1",
        "--min-epochs",
        "1",
        "--threads",
        "1",
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(out),
        "--log",
        str(tmp_path / "train.log"),
        *extra,
    ]
    monkeypatch.setattr(sys, "argv", argv)
    module.main()
    return out


def _small_corpus(name: str, kind: str, splits: dict[str, dict[str, int]], root: Path):  # type: ignore[no-untyped-def]
    """A corpus of a few clips per split, rendered under ``root``."""
    spec = CorpusSpec(name, kind, splits, train_voices=VOICES, test_only_voices=UNSEEN)
    return load_corpus(spec, root=root, workers=2)


def test_ast_recipe(tmp_path: Path, monkeypatch) -> None:
    splits = {
        "train": {"keywords": 1, "unknown": 2, "silence": 2},
        "calibration": {"keywords": 0, "unknown": 2, "silence": 2},
        "test": {"keywords": 0, "unknown": 2, "silence": 2},
    }
    corpus = _small_corpus("recipe-kws", "kws", splits, tmp_path)
    module = _recipe("train_ast")
    monkeypatch.setitem(module.CONFIG, "layers", 1)
    out = _run(module, corpus, tmp_path, monkeypatch, ["--batch", "16"])
    model = load_trained("ast", out)
    assert model.summary["epochs"] == 1 and 0.0 <= model.summary["test_accuracy"]["value"] <= 1.0
    assert len(model.labels) == 37 and "epoch" in (tmp_path / "train.log").read_text()
    with torch.no_grad():
        assert model.model(model.features(corpus.utterances("test")[0].audio())).shape == (1, 37)


def test_conformer_recipe_resumes(tmp_path: Path, monkeypatch) -> None:
    splits = {
        "train": {"sentences": 4, "digits": 2, "commands": 2},
        "calibration": {"sentences": 1, "digits": 1, "commands": 1},
        "test": {"sentences": 2, "digits": 0, "commands": 0},
    }
    corpus = _small_corpus("recipe-asr", "asr", splits, tmp_path)
    module = _recipe("train_conformer_ctc")
    monkeypatch.setitem(module.CONFIG, "layers", 1)
    out = _run(module, corpus, tmp_path, monkeypatch, [])
    first = load_trained("conformer-ctc", out)
    assert first.summary["epochs"] == 1 and first.summary["test_wer"]["n"] == 2
    # A second call with a larger epoch budget resumes from the work folder (epoch 2, not 1).
    _run(module, corpus, tmp_path, monkeypatch, ["--max-epochs", "2"])
    assert load_trained("conformer-ctc", out).summary["epochs"] == 2
    assert "resumed" in (tmp_path / "train.log").read_text()
