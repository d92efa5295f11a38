"""Write the committed renders of a sample of each TTS benchmark corpus: per evaluated
split, the first planned clip of every voice. ``tests/data/benchmark_corpus_sample.json``
holds each corpus's plan digest (what keys the accuracy cells), its engines' versions and
each sampled clip's SHA-256; ``tests/data/benchmark_corpus_sample.npz`` holds the clips'
16-bit samples. `test_benchmark_corpora_reproduce` re-renders those clips on the machine it
runs on (CI: a fresh one) and requires each to be bit-identical or within
``esc_ao.corpus.builder.REPRODUCTION_SNR_DB`` of its committed render.

    .venv/bin/python scripts/sample_corpus_hashes.py
"""

from __future__ import annotations

import hashlib
import io
import json
import wave
from pathlib import Path

import numpy as np

from esc_ao.atomic import atomic_path
from esc_ao.corpus import CORPORA, plan_digest, render_items
from esc_ao.corpus.builder import _plan
from esc_ao.corpus.voices import engine_version
from esc_ao.report import write_text_atomic

SPLITS = ("calibration", "test")  # the splits the accuracy cells are keyed by
DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def sample_ids(name: str) -> list[str]:
    """The first planned clip of every (split, voice) of the evaluated splits."""
    first: dict[tuple[str, str], str] = {}
    for job in sorted(_plan(CORPORA[name]), key=lambda j: j["id"]):
        if job["split"] in SPLITS:
            voice = "none" if job["set"] == "silence" else job["voice"].id
            first.setdefault((job["split"], voice), job["id"])
    return sorted(first.values())


def pcm(wav: bytes) -> np.ndarray:
    with wave.open(io.BytesIO(wav), "rb") as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def main() -> None:
    out, audio = {}, {}
    for name, spec in CORPORA.items():
        rendered = render_items(spec, sample_ids(name))
        engines = sorted({v.engine for v in spec.train_voices + spec.test_only_voices})
        out[name] = {
            "plan_digest": plan_digest(spec, SPLITS),
            "engines": {e: engine_version(e) for e in engines},
            "items": {i: hashlib.sha256(wav).hexdigest() for i, wav in rendered.items()},
        }
        audio.update({f"{name}/{i}": pcm(wav) for i, wav in rendered.items()})
    write_text_atomic(DATA / "benchmark_corpus_sample.json", json.dumps(out, indent=1, sort_keys=True) + "\n")
    with atomic_path(DATA / "benchmark_corpus_sample.npz", suffix=".npz") as tmp:
        np.savez_compressed(tmp, **audio)
    print(", ".join(f"{n}: {len(v['items'])} clips" for n, v in out.items()))


if __name__ == "__main__":
    main()
