"""The corpus builder: determinism, manifest, voice-disjoint splits, cache integrity, and
clear errors for missing engines. Small specs, real TTS engines (flite, festival,
espeak-ng, Piper), so every engine the benchmark uses is exercised."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esc_ao.corpus import CorpusSpec, MissingEngineError, Voice, augment, load_corpus, texts, verify
from esc_ao.corpus.voices import check_engine

# corpus builds synthesise audio: the slow tier
pytestmark = pytest.mark.slow

TRAIN = (Voice("flite", "kal16"), Voice("festival", "kal_diphone"), Voice("espeak-ng", "en-us"), Voice("piper", "joe"))
TEST_ONLY = (Voice("flite", "rms"), Voice("espeak-ng", "en-gb-scotland+m4"))


def _asr_spec(**kw) -> CorpusSpec:
    sizes = {
        "train": {"sentences": 4, "digits": 2, "commands": 2},
        "calibration": {"sentences": 2, "digits": 1, "commands": 1},
        "test": {"sentences": 4, "digits": 2, "commands": 2},
    }
    return CorpusSpec(kw.pop("name", "tiny-asr"), "asr", sizes, train_voices=TRAIN, test_only_voices=TEST_ONLY, **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("corpora")
    return load_corpus(_asr_spec(), root=root, workers=1), root


def test_manifest_records_what_the_issue_asks(built) -> None:
    corpus, _ = built
    m = corpus.manifest
    assert m["sample_rate"] == 16000 and m["text_licence"].startswith("public domain")
    assert set(m["engines"]) == {"flite", "festival", "espeak-ng", "piper"}
    assert len(m["items"]) == 8 + 4 + 8
    for e in m["items"]:
        for key in ("text", "voice", "engine", "engine_version", "seed", "sample_rate", "duration_s", "sha256"):
            assert key in e, key
        audio = corpus.utterances(e["split"])[0].audio()
        assert audio.dtype == np.float32 and np.abs(audio).max() <= 1.0
        assert e["duration_s"] == pytest.approx(e["samples"] / 16000, abs=1e-3)
        assert e["duration_s"] > 0.3  # real speech, not an empty file


def test_splits_are_disjoint_by_voice_and_text(built) -> None:
    corpus, _ = built
    test_only = {v.id for v in TEST_ONLY}
    for split in ("train", "calibration"):
        assert not {u.voice for u in corpus.utterances(split)} & test_only
    test = corpus.utterances("test")
    assert sum(u.voice in test_only for u in test) == len(test) // 2  # half unseen speakers
    texts_by_split = {s: {u.text for u in corpus.utterances(s)} for s in ("train", "calibration", "test")}
    assert not texts_by_split["train"] & texts_by_split["test"]
    assert not texts_by_split["calibration"] & texts_by_split["test"]


def test_same_seed_same_audio_other_seed_other_plan(built, tmp_path: Path) -> None:
    corpus, _ = built
    again = load_corpus(_asr_spec(), root=tmp_path, workers=2)  # other worker count too
    assert [e["sha256"] for e in again.manifest["items"]] == [e["sha256"] for e in corpus.manifest["items"]]
    other = load_corpus(_asr_spec(name="tiny-asr-seed1", seed=1), root=tmp_path, workers=1)
    assert [u.text for u in other.utterances("test")] != [u.text for u in corpus.utterances("test")]


def test_corrupt_or_partial_cache_is_detected_and_rebuilt(built, tmp_path: Path, caplog) -> None:
    corpus, root = built
    copy = tmp_path / "corpora" / "tiny-asr"
    shutil.copytree(corpus.root, copy)
    fingerprint = corpus.manifest["fingerprint"]
    assert verify(copy, fingerprint) is None
    victim = copy / corpus.manifest["items"][3]["file"]
    victim.write_bytes(victim.read_bytes()[:-100])  # truncated file
    assert "SHA-256" in verify(copy, fingerprint)
    with caplog.at_level("WARNING"):
        rebuilt = load_corpus(_asr_spec(), root=tmp_path, workers=1)
    assert "rebuilt" in caplog.text
    assert verify(rebuilt.root, fingerprint) is None
    (copy / "manifest.json").unlink()  # an interrupted build has no manifest
    assert "no manifest" in verify(copy, fingerprint)
    manifest = json.loads((corpus.root / "manifest.json").read_text())
    assert verify(corpus.root, "0" * 16).startswith("built for fingerprint")
    assert manifest["fingerprint"] == fingerprint


def test_missing_engine_names_the_package(monkeypatch) -> None:
    monkeypatch.setattr("esc_ao.corpus.voices.shutil.which", lambda _: None)
    with pytest.raises(MissingEngineError, match="apt-get install festival"):
        check_engine("festival")
    with pytest.raises(MissingEngineError, match="apt-get install flite"):
        load_corpus(_asr_spec(name="never-built"), root=Path("/nonexistent"))
    with pytest.raises(ValueError, match="unknown: use one of flite"):
        check_engine("sapi")


def test_unknown_corpus_and_overlapping_voices_are_rejected() -> None:
    with pytest.raises(ValueError, match="use one of asr, kws"):
        load_corpus("librispeech")
    with pytest.raises(ValueError, match="both train and test-only"):
        CorpusSpec(
            "x", "asr", {"train": {}, "calibration": {}, "test": {}}, train_voices=TRAIN, test_only_voices=(TRAIN[0],)
        )


def test_kws_clips_are_one_second_with_all_classes(tmp_path: Path) -> None:
    spec = CorpusSpec(
        "tiny-kws",
        "kws",
        {
            "train": {"keywords": 1, "unknown": 2, "silence": 2},
            "calibration": {"keywords": 0, "unknown": 1, "silence": 1},
            "test": {"keywords": 1, "unknown": 1, "silence": 1},
        },
        train_voices=TRAIN[:1] + TRAIN[2:3],
        test_only_voices=TEST_ONLY,
    )
    corpus = load_corpus(spec, root=tmp_path, workers=2)
    train = corpus.utterances("train")
    assert {u.label for u in train} == set(texts.KEYWORDS) | {"unknown", "silence"}
    assert all(u.meta["samples"] == 16000 for u in corpus.utterances("test") + train)
    silence = [u for u in train if u.label == "silence"]
    assert all(u.voice == "none" and np.abs(u.audio()).max() < 0.5 for u in silence)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_augmentation_is_seeded_and_bounded(seed: int) -> None:
    audio = (0.3 * np.sin(np.arange(8000) * 0.05)).astype(np.float32)
    a1 = augment.draw(np.random.default_rng(seed))
    y1 = augment.apply(audio, a1, np.random.default_rng(seed))
    y2 = augment.apply(audio, augment.draw(np.random.default_rng(seed)), np.random.default_rng(seed))
    assert np.array_equal(y1, y2)
    assert np.abs(y1).max() <= 0.99 + 1e-6 and np.isfinite(y1).all()
    assert abs(len(y1) - len(audio) / a1.speed) <= 2


def test_snr_of_added_noise_is_as_asked() -> None:
    rng = np.random.default_rng(0)
    speech = (0.1 * np.sin(np.arange(16000) * 0.1)).astype(np.float32)
    noisy = augment.apply(speech, augment.Augmentation(snr_db=10.0, noise="pink"), rng)
    snr = 10 * np.log10(np.mean(speech**2) / np.mean((noisy - speech) ** 2))
    assert snr == pytest.approx(10.0, abs=0.2)


def test_text_generators_are_deterministic_and_clean() -> None:
    a = [texts.sentence(np.random.default_rng(3)) for _ in range(5)]
    b = [texts.sentence(np.random.default_rng(3)) for _ in range(5)]
    assert a == b
    rng = np.random.default_rng(0)
    for make in (texts.sentence, texts.digit_string, texts.command):
        for _ in range(50):
            t = make(rng)
            assert t == t.lower() and "  " not in t and all(c.isalpha() or c == " " for c in t)
    assert len(texts.KEYWORDS) == 35 and not set(texts.KEYWORDS) & set(texts.UNKNOWN_WORDS)


def _snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - got.astype(np.float64)) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / noise)


def test_benchmark_corpora_reproduce() -> None:
    """The committed accuracy cells are keyed by the corpora's plans, not their bytes, so
    this machine must render the same plans to the same audio up to float noise: a sample
    of clips (every voice of the calibration and test splits, written by
    scripts/sample_corpus_hashes.py) re-rendered here must match its committed render bit
    for bit or within REPRODUCTION_SNR_DB, at the same length (Piper's ONNX kernels round
    differently with and without AVX-512: 2 of the 52 clips get other bytes)."""
    import io
    import wave

    from esc_ao.corpus import CORPORA, plan_digest, render_items
    from esc_ao.corpus.builder import REPRODUCTION_SNR_DB
    from esc_ao.corpus.voices import engine_version

    data = Path(__file__).parent / "data"
    sample = json.loads((data / "benchmark_corpus_sample.json").read_text())
    audio = np.load(data / "benchmark_corpus_sample.npz")
    assert set(sample) == set(CORPORA)
    for name, recorded in sample.items():
        spec = CORPORA[name]
        assert plan_digest(spec, ("calibration", "test")) == recorded["plan_digest"], (
            f"{name}: the plan or the engines changed, so no committed cell matches "
            f"(engines here: { {e: engine_version(e) for e in recorded['engines']} }, recorded: {recorded['engines']})"
        )
        assert len(recorded["items"]) >= 20
        got = render_items(spec, list(recorded["items"]))
        bad = {}
        for item, wav in got.items():
            with wave.open(io.BytesIO(wav), "rb") as w:
                pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
            ref = audio[f"{name}/{item}"]
            if len(pcm) != len(ref):
                bad[item] = f"{len(pcm)} samples, committed {len(ref)}"
            elif (snr := _snr_db(ref, pcm)) < REPRODUCTION_SNR_DB:
                bad[item] = f"{snr:.1f} dB"
        assert not bad, (
            f"{name}: {len(bad)} of {len(got)} clips render beyond float noise here "
            f"(< {REPRODUCTION_SNR_DB} dB or another length): {dict(list(bad.items())[:8])}; "
            "if the generator changed on purpose, bump esc_ao.corpus.builder.AUDIO_VERSION and rerun "
            "scripts/sample_corpus_hashes.py"
        )


def test_plan_digest_follows_the_plan_not_the_bytes(monkeypatch) -> None:
    from esc_ao.corpus import builder, plan_digest

    spec = _asr_spec()
    digest = plan_digest(spec)
    assert digest == plan_digest(spec) and len(digest) == 16
    assert plan_digest(spec, ("calibration", "test")) != digest  # another selection of splits
    assert plan_digest(_asr_spec(seed=1)) != digest  # another plan
    monkeypatch.setattr(builder, "AUDIO_VERSION", builder.AUDIO_VERSION + 1)  # a declared change of audio
    assert plan_digest(spec) != digest


def test_render_items_rejects_an_unknown_id() -> None:
    from esc_ao.corpus import render_items

    with pytest.raises(ValueError, match="test-99999"):
        render_items(_asr_spec(), ["test-99999"])
