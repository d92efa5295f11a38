"""The real-speech corpus: pinned packages, transcript normalisation, splits disjoint by
text, the manifest, cache integrity, and clear errors for missing or altered packages.

The packages (38 MB) are fetched once per module into a temporary root, or copied from
the user's cache when it already holds them; the full build then takes seconds."""

from __future__ import annotations

import dataclasses
import json
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esc_ao.corpus import MissingSourceError, cache_root, load_real_corpus, real, source_digest, verify
from esc_ao.corpus.texts import KEYWORDS


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("real")
    (root / "downloads").mkdir()
    for package in real.PACKAGES:  # fetch_package re-checks every hash
        cached = cache_root() / "downloads" / package.filename
        if cached.exists():
            shutil.copy(cached, root / "downloads" / package.filename)
    return root


@pytest.fixture(scope="module")
def corpus(root: Path):
    return load_real_corpus(root=root)


@pytest.fixture(scope="module")
def plan(root: Path) -> list[dict]:
    return real.plan_real_corpus(root)


# ------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    "raw, want",
    [
        ("Please press 1 to mute or unmute yourself.", "please press one to mute or unmute yourself"),
        ("[this is a simple beep tone]", ""),
        ("(10 seconds of silence)", ""),
        ("<beep ascending>", ""),
        ('IAX (note: does not say "2")', "iax"),
        ("at [@]", "at"),
        (
            "I'm sorry, that's not a valid extension.  Please try again.",
            "i'm sorry that's not a valid extension please try again",
        ),
        ("...to leave the conference.", "to leave the conference"),
        ("press * to toggle pause, press # to enter", "press star to toggle pause press pound to enter"),
        (
            "a 28.8 kilobit modem, extension 1234",
            "a twenty eight point eight kilobit modem extension one thousand two hundred thirty four",
        ),
        ("Call-Forward on No Answer", "call forward on no answer"),
        ("'quoted' users' o'clock", "quoted users o'clock"),
        ("Café DÉJÀ-vu", "cafe deja vu"),
        ("007", "zero zero seven"),
    ],
)
def test_normalize_transcript_examples(raw: str, want: str) -> None:
    assert real.normalize_transcript(raw) == want


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet=st.characters(codec="utf-8"), max_size=80)
    | st.text(alphabet="abcXYZ019'.,-*#&%()[]<>{} \t\n\u00e9\u0130", max_size=60)
)
def test_normalize_transcript_is_idempotent_and_plain(raw: str) -> None:
    once = real.normalize_transcript(raw)
    assert real.normalize_transcript(once) == once
    assert set(once) <= set("abcdefghijklmnopqrstuvwxyz' ")
    assert once == once.strip() and "  " not in once
    assert all(w.strip("'") == w for w in once.split())  # apostrophes only inside words


def test_number_words() -> None:
    assert real.number_words(0) == "zero"
    assert real.number_words(40) == "forty"
    assert real.number_words(305) == "three hundred five"
    assert real.number_words(4242) == "four thousand two hundred forty two"
    assert real.number_words(2_000_001) == "two million one"


def test_parse_transcripts_reads_name_colon_text() -> None:
    data = b"; Core Asterisk Sounds\n\ndigits/1: one\nvm-login: Comedian Mail.  Mailbox?\nbroken line\n"
    assert real.parse_transcripts(data) == {"digits/1": "one", "vm-login": "Comedian Mail.  Mailbox?"}


# ------------------------------------------------------------------------------- the plan


def test_full_plan_sizes_and_disjoint_splits(plan: list[dict]) -> None:
    by_split = {s: [e for e in plan if e["split"] == s] for s in ("calibration", "test")}
    assert len(by_split["test"]) >= 300
    assert len(by_split["calibration"]) >= 50
    assert {e["split"] for e in plan} == {"calibration", "test"}
    texts = {s: {e["text"] for e in items} for s, items in by_split.items()}
    assert not texts["calibration"] & texts["test"]
    assert len({e["id"] for e in plan}) == len(plan)
    assert all(e["text"] and e["duration_s"] <= real.MAX_SECONDS for e in plan)
    assert {e["set"] for e in by_split["test"]} == {"prompts", "words", "digits", "letters"}
    # Other speakers and doubtful transcripts only calibrate.
    assert all(e["split"] == "calibration" for e in plan if e["package"] != "asterisk-core-sounds-en-wav")
    assert {e["set"] for e in plan if e["package"] == "moonshine-voice"} == {"readings"}
    doubtful = {e["original"].removeprefix("en_US_f_Allison/").removesuffix(".wav") for e in plan if e["doubtful"]}
    assert doubtful == set(real._DOUBTFUL)  # every entry names a recording, and all of them calibrate
    assert all(e["split"] == "calibration" for e in plan if e["doubtful"])


def test_plan_labels_and_sets(plan: list[dict]) -> None:
    for e in plan:
        assert e["n_words"] == len(e["text"].split())
        if e["set"] in ("words", "digits", "letters"):
            assert e["n_words"] == 1 and e["label"] == e["text"]
        else:
            assert e["label"] == e["set"]
    digits = {e["text"] for e in plan if e["set"] == "digits"}
    assert {"zero", "five", "ninety"} <= digits
    assert {e["text"] for e in plan if e["set"] == "letters"} <= set("abcdefghijklmnopqrstuvwxyz")


def test_split_rule_is_a_function_of_the_text(plan: list[dict]) -> None:
    split_of: dict[str, str] = {}
    for e in plan:
        assert split_of.setdefault(e["text"], e["split"]) == e["split"]


def test_non_speech_and_long_recordings_are_excluded(corpus) -> None:
    excluded = {e["original"]: e["reason"] for e in corpus.manifest["excluded"]}
    assert "not speech" in excluded["en_US_f_Allison/beep.wav"]
    assert "not speech" in excluded["en_US_f_Allison/silence/1.wav"]
    assert "longer than 30 s" in excluded["en_US_f_Allison/demo-instruct.wav"]
    assert "synthetic" in excluded["moonshine_voice/assets/endgame_nagg_nell.wav"]
    kept = {e["original"] for e in corpus.manifest["items"]}
    assert not kept & set(excluded)


# ------------------------------------------------------------------------ the built corpus


def test_manifest_records_sources_and_items(corpus, plan: list[dict]) -> None:
    m = corpus.manifest
    assert m["corpus"] == "real-asr" and m["sample_rate"] == 16000 and m["fingerprint"] == real.real_fingerprint()
    assert set(m["sources"]) == {p.name for p in real.PACKAGES}
    for p in real.PACKAGES:
        s = m["sources"][p.name]
        assert (s["version"], s["sha256"], s["file"], s["licence"]) == (p.version, p.sha256, p.filename, p.licence)
    assert [{k: v for k, v in e.items() if k != "sha256"} for e in m["items"]] == plan
    for e in m["items"]:
        for key in (
            "id",
            "split",
            "set",
            "text",
            "label",
            "voice",
            "speaker",
            "package",
            "package_version",
            "licence",
            "original",
            "sample_rate",
            "samples",
            "duration_s",
            "sha256",
            "transcript",
        ):
            assert key in e, key
    assert m["sizes"]["train"] == {}
    assert sum(sum(s.values()) for s in m["sizes"].values()) == len(m["items"])


def test_audio_is_16k_mono_int16_within_range(corpus) -> None:
    items = corpus.utterances("test")[::40] + corpus.utterances("calibration")[::15]
    for u in items:
        with wave.open(str(u.path), "rb") as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
            assert w.getnframes() == u.meta["samples"]
        audio = u.audio()
        assert audio.dtype == np.float32 and np.abs(audio).max() <= 1.0
        assert np.abs(audio).max() > 0.05  # speech, not silence
    assert corpus.utterances("train") == []


def _audio_hashes(manifest: dict) -> list[tuple[str, str]]:
    return [(e["id"], e["sha256"]) for e in manifest["items"]]


def test_cached_corpus_is_reused(corpus, root: Path) -> None:
    again = load_real_corpus(root=root)
    assert _audio_hashes(again.manifest) == _audio_hashes(corpus.manifest)


def test_source_digest_needs_no_download_and_follows_the_rules(monkeypatch) -> None:
    digest = source_digest()
    assert len(digest) == 16 and source_digest() == digest
    monkeypatch.setattr(real, "CALIBRATION_PERCENT", real.CALIBRATION_PERCENT + 1)
    assert source_digest() != digest
    monkeypatch.undo()
    repinned = dataclasses.replace(real.ASTERISK_WAV, sha256="1" * 64)
    monkeypatch.setattr(real, "PACKAGES", (repinned,) + real.PACKAGES[1:])
    assert source_digest() != digest


def test_keyword_clips(corpus) -> None:
    clips = real.keyword_clips(corpus, "test")
    assert clips and all(len(u.text.split()) == 1 and u.label == u.text for u in clips)
    known = real.keyword_clips(corpus, "test", KEYWORDS)
    assert known and {u.text for u in known} <= set(KEYWORDS)


def test_render_does_not_depend_on_thread_count(corpus) -> None:
    rec = real._Recording(
        real.ASTERISK_WAV, "x.wav", "x", "x", "s", (np.sin(np.arange(8000) / 3.0) * 12000).astype("<i2"), 8000
    )
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = real._render(rec)
        torch.set_num_threads(max(2, prev))
        assert real._render(rec) == one
    finally:
        torch.set_num_threads(prev)


def test_corrupt_or_partial_cache_is_rebuilt(corpus, root: Path, tmp_path: Path, caplog) -> None:
    other = tmp_path / "root"
    (other / "corpora").mkdir(parents=True)
    (other / "downloads").symlink_to(root / "downloads")
    folder = other / "corpora" / "real-asr"
    shutil.copytree(corpus.root, folder)
    fingerprint = corpus.manifest["fingerprint"]
    assert verify(folder, fingerprint) is None
    item = corpus.manifest["items"][7]
    victim = folder / item["file"]
    victim.write_bytes(victim.read_bytes()[:-200])
    with caplog.at_level("WARNING"):
        rebuilt = load_real_corpus(root=other)
    assert any("rebuilt" in r.message and "SHA-256" in r.message for r in caplog.records)
    assert verify(folder, fingerprint) is None
    assert _audio_hashes(rebuilt.manifest) == _audio_hashes(corpus.manifest)
    # A build interrupted before its manifest is not taken for a corpus either.
    (folder / "manifest.json").unlink()
    assert "no manifest.json" in verify(folder, fingerprint)


# ---------------------------------------------------------------------------- fetch errors


def test_download_with_other_bytes_is_deleted_and_raises(tmp_path: Path, monkeypatch) -> None:
    def fake(package: real.Package, into: Path) -> None:
        (into / package.filename).write_bytes(b"not the pinned package")

    monkeypatch.setattr(real, "_download", fake)
    with pytest.raises(real.SourceHashError, match="asterisk-core-sounds-en 1.6.1-1.*SHA-256"):
        real.fetch_package(real.ASTERISK_TEXT, tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing left behind, not even the temporary folder


def test_cached_file_with_other_bytes_is_fetched_again(root: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    good = (root / "downloads" / real.ASTERISK_TEXT.filename).read_bytes()
    (tmp_path / real.ASTERISK_TEXT.filename).write_bytes(good[:-10])  # truncated download
    monkeypatch.setattr(real, "_download", lambda p, into: (into / p.filename).write_bytes(good))
    with caplog.at_level("WARNING"):
        path = real.fetch_package(real.ASTERISK_TEXT, tmp_path)
    assert path.read_bytes() == good and "fetched again" in caplog.text


def test_pinned_hash_mismatch_names_the_package(root: Path, tmp_path: Path, monkeypatch) -> None:
    wrong = dataclasses.replace(real.MOONSHINE, sha256="0" * 64)
    wheel = (root / "downloads" / real.MOONSHINE.filename).read_bytes()
    monkeypatch.setattr(real, "_download", lambda p, into: (into / p.filename).write_bytes(wheel))
    with pytest.raises(real.SourceHashError, match="moonshine-voice 0.1.5"):
        real.fetch_package(wrong, tmp_path)
    assert not (tmp_path / real.MOONSHINE.filename).exists()


@pytest.mark.parametrize(
    "package, command",
    [
        (real.ASTERISK_WAV, "apt-get download asterisk-core-sounds-en-wav=1.6.1-1"),
        (real.MOONSHINE, "pip download --no-deps --only-binary=:all: --platform manylinux_2_34_x86_64"),
    ],
)
def test_missing_package_names_it_and_the_command(
    package: real.Package, command: str, root: Path, tmp_path: Path, monkeypatch
) -> None:
    def offline(p: real.Package, into: Path) -> None:
        raise MissingSourceError(f"{p.name}: exited 100: E: Unable to locate package")

    monkeypatch.setattr(real, "_download", offline)
    with pytest.raises(MissingSourceError) as info:
        real.fetch_package(package, tmp_path)
    message = str(info.value)
    assert package.label in message and command in message and package.sha256 in message
    # The whole build says the same (the other packages are there), and leaves no corpus behind.
    (tmp_path / "downloads").mkdir()
    for other in real.PACKAGES:
        if other != package:
            (tmp_path / "downloads" / other.filename).symlink_to(root / "downloads" / other.filename)
    with pytest.raises(MissingSourceError, match=package.name):
        load_real_corpus(root=tmp_path)
    assert not (tmp_path / "corpora").exists()


def test_unknown_corpus_name() -> None:
    with pytest.raises(ValueError, match="real-asr"):
        load_real_corpus("real-other")


def test_manifest_is_json_round_trippable(corpus) -> None:
    text = (corpus.root / "manifest.json").read_text()
    assert json.loads(text) == corpus.manifest
