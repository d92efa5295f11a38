"""Building, caching and loading the speech corpora.

Two corpora, both generated offline and deterministically from a seed:

- ``asr``: sets (a) sentences and (b) connected digits and short commands, for ASR;
- ``kws``: set (c), the 35 Speech Commands keywords plus "unknown" and "silence", 1 s clips.

Each has train / calibration / test splits. Voices in ``TEST_ONLY_VOICES`` speak half of
the test split and nothing else, so test accuracy includes a speaker the models never
heard; the other half of the test split is unseen text from the training voices. Test
texts are drawn first, then calibration, then train, each unique across splits, so resizing
the train split never changes the test split.

The cache directory holds one folder per corpus with WAV files and ``manifest.json`` (text,
voice, engine and version, seed, sample rate, duration, augmentation and SHA-256 of every
clip). A folder is used only when its manifest matches the requested spec and every file
matches its hash; otherwise it is rebuilt (and a warning says why). Builds happen in a
temporary folder renamed into place, so an interrupted build leaves nothing that looks
complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import wave
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from esc_ao.corpus import augment, texts
from esc_ao.corpus.voices import SAMPLE_RATE, Voice, check_engine, engine_version

__all__ = [
    "CORPORA",
    "Corpus",
    "CorpusSpec",
    "TEST_ONLY_VOICES",
    "TRAIN_VOICES",
    "Utterance",
    "cache_root",
    "load_corpus",
    "plan_digest",
    "render_items",
]

log = logging.getLogger(__name__)

FORMAT = 1
# Bumped when a change of the generator (texts, augmentation, engines' use, resampling)
# moves the rendered audio beyond float noise: it keys the benchmark's results (plan_digest).
AUDIO_VERSION = 1
# A re-render of a committed clip on any CPU must stay this close to it (measured: thread
# count or ONNX graph optimisation changes Piper's clips by at most 1 LSB, 88-101 dB).
REPRODUCTION_SNR_DB = 60.0
SPLITS = ("train", "calibration", "test")

TRAIN_VOICES: tuple[Voice, ...] = (
    Voice("flite", "kal16"),
    Voice("flite", "awb"),
    Voice("flite", "slt"),
    Voice("festival", "kal_diphone"),
    Voice("festival", "cmu_us_slt_arctic_hts"),
    Voice("espeak-ng", "en-us"),
    Voice("espeak-ng", "en-us+m3"),
    Voice("espeak-ng", "en-us+f2"),
    Voice("espeak-ng", "en-gb+m1"),
    Voice("espeak-ng", "en-gb+f3"),
    Voice("piper", "joe"),
)
TEST_ONLY_VOICES: tuple[Voice, ...] = (
    Voice("flite", "rms"),
    Voice("festival", "ked_diphone"),
    Voice("espeak-ng", "en-gb-scotland+m4"),
)
KWS_SECONDS = 1.0
RENDER_THREADS = 2  # the corpora in docs/ were built so; see _render


@dataclass(frozen=True)
class CorpusSpec:
    """What to build: ``sizes[split][set]`` items per split and set, from ``seed``."""

    name: str
    kind: str  # "asr" or "kws"
    sizes: dict[str, dict[str, int]]
    seed: int = 0
    train_voices: tuple[Voice, ...] = TRAIN_VOICES
    test_only_voices: tuple[Voice, ...] = TEST_ONLY_VOICES

    def __post_init__(self) -> None:
        if self.kind not in ("asr", "kws"):
            raise ValueError(f"CorpusSpec.kind={self.kind!r}: use 'asr' or 'kws'")
        if set(self.sizes) != set(SPLITS):
            raise ValueError(f"CorpusSpec.sizes has splits {sorted(self.sizes)}: give exactly {SPLITS}")
        overlap = {v.id for v in self.train_voices} & {v.id for v in self.test_only_voices}
        if overlap:
            raise ValueError(f"voices {sorted(overlap)} are both train and test-only: a test-only voice must be unseen")

    def fingerprint(self) -> str:
        """Changes with the spec, the engines' versions and the generator's own code."""
        code = b"".join(Path(m.__file__).read_bytes() for m in (texts, augment) if m.__file__)
        engines = sorted({v.engine for v in self.train_voices + self.test_only_voices})
        payload = json.dumps(
            {
                "format": FORMAT,
                "spec": asdict(self),
                "engines": {e: engine_version(e) for e in engines},
                "code": hashlib.sha256(code).hexdigest(),
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


CORPORA: dict[str, CorpusSpec] = {
    "asr": CorpusSpec(
        "asr",
        "asr",
        {
            "train": {"sentences": 2000, "digits": 600, "commands": 600},
            "calibration": {"sentences": 100, "digits": 50, "commands": 50},
            "test": {"sentences": 200, "digits": 50, "commands": 50},
        },
    ),
    # kws sizes are per keyword for "keywords"; "unknown" and "silence" are totals.
    "kws": CorpusSpec(
        "kws",
        "kws",
        {
            # 300 per keyword: at 60 a CNN reached 43 % and the AST 18 % held-out accuracy
            # (overfitting across voices and augmentations).
            "train": {"keywords": 300, "unknown": 1500, "silence": 600},
            "calibration": {"keywords": 4, "unknown": 20, "silence": 10},
            "test": {"keywords": 16, "unknown": 64, "silence": 32},
        },
    ),
}


@dataclass(frozen=True)
class Utterance:
    """One clip of a corpus. ``label`` is the class name (kws) or the set name (asr)."""

    id: str
    split: str
    set: str
    text: str
    label: str
    voice: str
    path: Path
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def audio(self) -> np.ndarray:
        with wave.open(str(self.path), "rb") as w:
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return pcm.astype(np.float32) / 32768.0


@dataclass
class Corpus:
    spec: CorpusSpec
    root: Path
    manifest: dict[str, Any]

    def utterances(self, split: str, subset: str | None = None) -> list[Utterance]:
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: use one of {', '.join(SPLITS)}")
        return [
            Utterance(e["id"], e["split"], e["set"], e["text"], e["label"], e["voice"], self.root / e["file"], e)
            for e in self.manifest["items"]
            if e["split"] == split and (subset is None or e["set"] == subset)
        ]

    @property
    def labels(self) -> list[str]:
        """Class names of a kws corpus, in a fixed order (keywords, unknown, silence)."""
        return [*texts.KEYWORDS, "unknown", "silence"]


def cache_root() -> Path:
    """``$ESC_AO_CACHE`` or ``~/.cache/esc-ao``."""
    return Path(os.environ.get("ESC_AO_CACHE", Path.home() / ".cache" / "esc-ao")).expanduser()


def load_corpus(name: str | CorpusSpec, root: Path | None = None, workers: int | None = None) -> Corpus:
    """The corpus, from the cache when it is complete and intact, otherwise built (minutes)."""
    spec = CORPORA.get(name) if isinstance(name, str) else name
    if spec is None:
        raise ValueError(f"corpus {name!r} is unknown: use one of {', '.join(CORPORA)}")
    for voice in spec.train_voices + spec.test_only_voices:
        check_engine(voice.engine)
    folder = (root or cache_root()) / "corpora" / spec.name
    fingerprint = spec.fingerprint()
    problem = verify(folder, fingerprint)
    if problem is None:
        return Corpus(spec, folder, json.loads((folder / "manifest.json").read_text()))
    if folder.exists():
        log.warning("corpus %s at %s is rebuilt: %s", spec.name, folder, problem)
    manifest = _build(spec, folder, fingerprint, workers)
    return Corpus(spec, folder, manifest)


def plan_digest(spec: CorpusSpec, splits: tuple[str, ...] = SPLITS) -> str:
    """Hash (16 hex digits) of what ``splits`` of ``spec`` are meant to hold: every planned
    clip's id, text, label, voice and seed, the engines' versions and ``AUDIO_VERSION``.

    It keys benchmark results, so it leaves out the rendered bytes on purpose: the same
    plan renders to audio that differs by a least significant bit or so between CPUs
    (Piper's ONNX kernels differ with AVX-512), and such noise must not invalidate hours of
    results. A change of rendering that moves the audio beyond that noise bumps
    ``AUDIO_VERSION``; test_benchmark_corpora_reproduce (within ``REPRODUCTION_SNR_DB``
    of the committed renders) fails until it does. Computed from the plan, so no build is
    needed to know it."""
    engines = sorted({v.engine for v in spec.train_voices + spec.test_only_voices})
    h = hashlib.sha256(
        json.dumps(
            {"audio_version": AUDIO_VERSION, "name": spec.name, "engines": {e: engine_version(e) for e in engines}},
            sort_keys=True,
        ).encode()
    )
    for job in sorted((j for j in _plan(spec) if j["split"] in splits), key=lambda j: j["id"]):
        h.update(
            json.dumps([job["id"], job["split"], job["text"], job["label"], job["voice"].id, job["seed"]]).encode()
        )
    return h.hexdigest()[:16]


def verify(folder: Path, fingerprint: str) -> str | None:
    """None when ``folder`` holds a complete corpus with this fingerprint, else what is wrong."""
    path = folder / "manifest.json"
    if not path.exists():
        return "no manifest.json (missing or interrupted build)"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"manifest.json unreadable ({exc})"
    if manifest.get("fingerprint") != fingerprint:
        return f"built for fingerprint {manifest.get('fingerprint')}, need {fingerprint} (spec, engine or code changed)"
    for item in manifest.get("items", []):
        f = folder / item["file"]
        if not f.exists():
            return f"{item['file']} is missing"
        if hashlib.sha256(f.read_bytes()).hexdigest() != item["sha256"]:
            return f"{item['file']} does not match its SHA-256 (corrupt or modified)"
    return None


def _plan(spec: CorpusSpec) -> list[dict[str, Any]]:
    """Every item's text, voice and augmentation, drawn in a fixed order from the seed."""
    seen: set[str] = set()
    jobs: list[dict[str, Any]] = []
    for split_code, split in ((2, "test"), (1, "calibration"), (0, "train")):
        rng = np.random.default_rng([spec.seed, split_code])
        for subset, count in spec.sizes[split].items():
            for text, label in _texts(spec.kind, subset, count, rng, seen):
                voice = _voice_for(spec, split, len(jobs), rng)
                jobs.append(
                    {
                        "split": split,
                        "set": subset,
                        "text": text,
                        "label": label,
                        "voice": voice,
                        "seed": [spec.seed, split_code, len(jobs)],
                    }
                )
    for i, job in enumerate(sorted(jobs, key=lambda j: SPLITS.index(j["split"]))):
        job["id"] = f"{job['split']}-{i:05d}"
    return jobs


def _voice_for(spec: CorpusSpec, split: str, index: int, rng: np.random.Generator) -> Voice:
    # Half the test split from test-only voices, alternating, so both halves are the same size.
    pool = spec.test_only_voices if split == "test" and index % 2 == 0 else spec.train_voices
    return pool[int(rng.integers(len(pool)))]


def _texts(kind: str, subset: str, count: int, rng: np.random.Generator, seen: set[str]) -> Iterator[tuple[str, str]]:
    if kind == "kws":
        if subset == "keywords":
            for _ in range(count):
                for word in texts.KEYWORDS:
                    yield word, word
        elif subset == "unknown":
            for _ in range(count):
                yield texts.UNKNOWN_WORDS[int(rng.integers(len(texts.UNKNOWN_WORDS)))], "unknown"
        elif subset == "silence":
            for _ in range(count):
                yield "", "silence"
        else:
            raise ValueError(f"kws set {subset!r}: use keywords, unknown or silence")
        return
    make: Callable[[np.random.Generator], str] = {
        "sentences": texts.sentence,
        "digits": texts.digit_string,
        "commands": texts.command,
    }[subset]
    made, tries = 0, 0
    while made < count:
        text, tries = make(rng), tries + 1
        if tries > 50 * count + 1000:
            raise RuntimeError(f"cannot draw {count} distinct {subset} texts; the grammar is too small")
        if text in seen:
            continue
        seen.add(text)
        made += 1
        yield text, subset


def _render(job: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """One item -> (manifest entry without file hash, 16-bit PCM bytes), always on
    ``RENDER_THREADS`` torch threads: resampling and the phase vocoder round differently
    with another thread count (measured: 1 thread changed 1 clip in 15 against the cache
    built with 2), and the corpus must not depend on the machine's core count."""
    prev = torch.get_num_threads()
    torch.set_num_threads(RENDER_THREADS)
    try:
        return _render_on_threads(job)
    finally:
        torch.set_num_threads(prev)


def _render_on_threads(job: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    rng = np.random.default_rng(job["seed"])
    voice: Voice = job["voice"]
    kws = job["set"] in ("keywords", "unknown", "silence")
    length = int(KWS_SECONDS * SAMPLE_RATE) if kws else None
    if job["set"] == "silence":
        aug = augment.Augmentation(snr_db=None, noise=augment.NOISE_COLOURS[int(rng.integers(4))])
        level = float(10 ** rng.uniform(-3.5, -1.3))
        audio = augment.noise(rng, length or SAMPLE_RATE, aug.noise) * np.float32(level)
        extra: dict[str, Any] = {"noise_rms": round(level, 6)}
    else:
        aug = augment.draw(rng)
        audio = augment.apply(augment.trim_silence(voice.synthesize(job["text"])), aug, rng, length)
        extra = {}
    pcm = np.clip(np.round(audio * 32768.0), -32768, 32767).astype("<i2")
    entry = {k: job[k] for k in ("id", "split", "set", "text", "label", "seed")}
    entry.update(
        voice=voice.id if job["set"] != "silence" else "none",
        engine=voice.engine if job["set"] != "silence" else "none",
        augmentation=aug.to_dict(),
        sample_rate=SAMPLE_RATE,
        samples=int(len(pcm)),
        duration_s=round(len(pcm) / SAMPLE_RATE, 4),
        **extra,
    )
    return entry, pcm.tobytes()


def _build(spec: CorpusSpec, folder: Path, fingerprint: str, workers: int | None) -> dict[str, Any]:
    from tqdm import tqdm

    jobs = _plan(spec)
    tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for split in SPLITS:
        (tmp / split).mkdir(parents=True)
    engines = sorted({v.engine for v in spec.train_voices + spec.test_only_voices})
    items = []
    n_workers = workers or min(2, os.cpu_count() or 1)
    # Workers are spawned, not forked: a fork of a process whose torch has run OpenMP
    # regions deadlocks in the child (seen: the test suite hung in resample's kernel).
    with (
        ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("spawn"))
        if n_workers > 1
        else nullcontext() as pool
    ):
        results = pool.map(_render, jobs, chunksize=16) if pool is not None else map(_render, jobs)
        for entry, pcm in tqdm(results, total=len(jobs), desc=f"corpus {spec.name}", mininterval=5):
            entry["file"] = f"{entry['split']}/{entry['id']}.wav"
            entry["engine_version"] = engine_version(entry["engine"]) if entry["engine"] != "none" else None
            wav = _wav_bytes(pcm)
            (tmp / entry["file"]).write_bytes(wav)
            entry["sha256"] = hashlib.sha256(wav).hexdigest()
            items.append(entry)
    manifest = {
        "format": FORMAT,
        "corpus": spec.name,
        "kind": spec.kind,
        "fingerprint": fingerprint,
        "seed": spec.seed,
        "sample_rate": SAMPLE_RATE,
        "text_licence": texts.TEXT_LICENCE,
        "engines": {e: engine_version(e) for e in engines},
        "voices": {"train": [v.id for v in spec.train_voices], "test_only": [v.id for v in spec.test_only_voices]},
        "sizes": spec.sizes,
        "items": items,
    }
    return publish(tmp, folder, manifest)


def publish(tmp: Path, folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Writes ``manifest.json`` into the finished ``tmp`` folder, then swaps it in for
    ``folder``. The manifest is the completion mark, so it is written last: a folder
    without one is a partial build and is never used."""
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=0) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(folder)
    return manifest


def render_items(spec: CorpusSpec, ids: Iterable[str]) -> dict[str, bytes]:
    """The WAV bytes each planned item ``ids`` of ``spec`` would have in a full build,
    rendering only those items: a few clips of a large corpus checked against committed
    renders tell whether this machine's engines and libraries still produce the benchmark's
    audio, without the 35-minute build."""
    jobs = {job["id"]: job for job in _plan(spec)}
    unknown = sorted(set(ids) - set(jobs))
    if unknown:
        raise ValueError(
            f"items {unknown[:5]} are not in corpus {spec.name!r}'s plan "
            f"(ids look like 'test-00012'; the plan has {len(jobs)} items)"
        )
    return {i: _wav_bytes(_render(jobs[i])[1]) for i in ids}


def _wav_bytes(pcm: bytes) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm)
    return buf.getvalue()
