"""The accuracy benchmark's cell cache: which cells exist and what keys them.

A cell is one (model, method, bits) result, stored as one JSON file and keyed by the
calibration count, the seed, for ESC its search settings, and a code version: a hash of
the sources that decide the numbers (quantizer, observers, features, the benchmark's
computation; for ESC cells also the search: calibrate, local step, search space), the
versions of the numeric packages (torch, torchao, numpy; cma for ESC), the model's own
task code and trained weights, and the content of its corpus's calibration and test
splits (texts, labels, audio hashes; not the builder's code, so a change in how corpora
are built keeps the cells while any change of audio recomputes them). Changing shared code
recomputes every cell, changing the search only the ESC cells, retraining one model only
that model's cells; the key's own code (this module) and the table's layout
(accuracy_table.py) are not part of it: the settings it reads are in the cell's name.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path

from esc_ao.corpus import built_digest

__all__ = ["BITS", "MODELS", "MODEL_CORPUS", "AccuracySettings", "cell_path", "code_version"]

MODELS = ("whisper-tiny.en", "conformer-ctc", "ast")
BITS = ("w8a8", "w4a8", "w4a4")
MODEL_CORPUS = {"whisper-tiny.en": "asr", "conformer-ctc": "asr", "ast": "kws"}
# Sources that decide every cell's numbers (relative to the esc_ao package), those that
# decide only ESC cells' (the search), and those that decide one model's: its task code and
# its trained weights.
_NUMERIC_SOURCES = ("annotators.py", "config.py", "graph_prep.py", "histogram.py", "metrics.py", "objectives.py",
                    "observers.py", "pipeline.py", "quantizer.py", "speech/features.py", "bench/accuracy.py",
                    "bench/tasks.py", "eval_graph.py")
_SEARCH_SOURCES = ("calibrate.py", "local_step.py", "search_space.py")
_NUMERIC_PACKAGES = ("torch", "torchao", "numpy")
_SEARCH_PACKAGES = ("cma",)
_MODEL_SOURCES = {
    "whisper-tiny.en": ("bench/whisper_task.py", "speech/whisper.py", "speech/ct2_whisper.py"),
    "conformer-ctc": ("bench/conformer_task.py", "speech/conformer.py", "speech/attention.py", "speech/pretrained.py",
                      "data/models/conformer_ctc.pt"),
    "ast": ("bench/ast_task.py", "speech/ast.py", "speech/pretrained.py", "data/models/ast.pt"),
}
_EVAL_SPLITS = ("calibration", "test")


@dataclass(frozen=True)
class AccuracySettings:
    """How cells are computed. ``budget``/``popsize``/``sigma0``: ESC's CMA-ES generations,
    population and initial step; the other fields are the paper's."""

    n_calibration: int = 100
    seed: int = 0
    budget: int = 30
    popsize: int | None = 8
    sigma0: float = 0.1


def code_version(model: str, method: str) -> str:
    """Hash (12 hex digits) of the shared sources, for ESC the search's, ``model``'s own
    (task code, weights), the numeric packages' versions and the model's corpus's
    evaluation content.

    Raises:
        FileNotFoundError: the model's corpus is not built (the version depends on its audio).
    """
    digest = built_digest(MODEL_CORPUS[model], _EVAL_SPLITS)
    if digest is None:
        raise FileNotFoundError(f"corpus {MODEL_CORPUS[model]!r} (used by {model}) is not built: "
                                f"run `esc-ao corpus {MODEL_CORPUS[model]}` first")
    root = Path(__file__).resolve().parents[1]
    esc = method == "esc"
    h = hashlib.sha256(digest.encode())
    for name in _NUMERIC_PACKAGES + (_SEARCH_PACKAGES if esc else ()):
        h.update(f"{name}=={package_version(name)}".encode())
    for rel in _NUMERIC_SOURCES + (_SEARCH_SOURCES if esc else ()) + _MODEL_SOURCES[model]:
        path = root / rel
        files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts) if path.is_dir() \
            else [path] if path.exists() else []
        for f in files:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def cell_path(cells: Path, model: str, method: str, bits: str, settings: AccuracySettings, version: str) -> Path:
    """One cell's file: keyed by model, method, bits, calibration count, seed, ESC's search
    settings (ESC cells only) and code version."""
    search = f"-b{settings.budget}p{settings.popsize}g{settings.sigma0:g}" if method == "esc" else ""
    return cells / model / f"{method}-{bits}-n{settings.n_calibration}-s{settings.seed}{search}-{version}.json"
