"""A corpus of real human speech for the accuracy benchmark, built offline from packages.

The TTS corpora (esc_ao.corpus.builder) measure accuracy on synthetic voices only; this
corpus checks that what a quantized model keeps on them it also keeps on human speech.

Sources (each pinned by version and SHA-256 of the package file):

- Debian ``asterisk-core-sounds-en-wav`` 1.6.1-1: the Asterisk PBX's English prompts, 568
  studio recordings by one professional speaker (Allison Smith), 8 kHz telephone band,
  CC-BY-SA-3.0. Their transcripts are ``core-sounds-en.txt.gz`` in ``asterisk-core-sounds-en``
  (same source package and licence), one ``name: text`` line per file.
- PyPI ``moonshine-voice`` 0.1.5 (MIT): two human readings shipped as test audio.
  ``beckett.wav`` (10 s, the Beckett line its docs quote for it) is used whole;
  ``two_cities.wav`` (44 s, the public-domain first paragraph of *A Tale of Two Cities*) is
  cut at its three longest pauses into four readings under Whisper's 30 s window, the
  text taken from the novel. Left out: ``endgame_nagg_nell.wav`` (upstream synthesised it
  with ZipVoice TTS) and ``clone-test.wav`` (its documented transcript is of another clip).

The builder fetches the package files into ``cache_root()/downloads`` (``apt-get download``,
``pip download --no-deps``), checks their SHA-256, reads the recordings straight from the
archives (no install), resamples them to 16 kHz mono int16 and writes
``cache_root()/corpora/real-asr/`` with a ``manifest.json`` in the TTS corpora's layout, so
``Corpus`` and ``verify`` work on it unchanged. ``source_digest()`` says what it holds
without fetching or building anything (benchmark cells are keyed by it).

Transcripts are normalised (``normalize_transcript``) to the CTC alphabet: lower-case
``[a-z']`` words, single spaces, numbers spelled out, notes such as ``[beep]`` removed.
Recordings whose transcript is empty after that (tones, beeps, silence) and recordings
over ``MAX_SECONDS`` are left out; the manifest lists each with the reason.

Splits (no ``train`` split: this corpus only calibrates and tests):

- ``test``: Asterisk prompts with an exact transcript;
- ``calibration``: a quarter of the Asterisk texts (chosen by a hash of the text, so adding
  or fixing one item never moves another), the prompts whose transcript is doubtful
  (``_DOUBTFUL``: acronyms with no agreed spelling, words the transcript seems to miss) and
  the moonshine readings (other speakers, so calibration hears more than one voice).

Every recording with the same text lands in the same split, so the splits are disjoint by
text. Sets: ``prompts`` (several words), ``words`` (one word: the keyword clips),
``digits`` (one cardinal number word), ``letters`` (one spelled letter), ``readings``
(moonshine). ``label`` is the word itself for one-word clips, otherwise the set name.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import wave
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torchaudio
import torchaudio.functional as AF

from esc_ao.corpus.builder import (
    RENDER_THREADS,
    Corpus,
    CorpusSpec,
    Utterance,
    _wav_bytes,
    cache_root,
    publish,
    verify,
)
from esc_ao.corpus.voices import SAMPLE_RATE

__all__ = [
    "CORPUS_NAME",
    "MAX_SECONDS",
    "PACKAGES",
    "MissingSourceError",
    "Package",
    "SourceHashError",
    "fetch_package",
    "keyword_clips",
    "load_real_corpus",
    "normalize_transcript",
    "plan_real_corpus",
    "real_fingerprint",
    "source_digest",
]

log = logging.getLogger(__name__)

FORMAT = 1
# Bump when a rule in this module's code changes which items the corpus holds, their
# texts, splits or sets, or how they are rendered (source_digest follows it).
PLAN_VERSION = 1
CORPUS_NAME = "real-asr"
MAX_SECONDS = 30.0  # Whisper's window: a longer clip would be cut, and its WER with it
SEED = 0
CALIBRATION_PERCENT = 25  # share of the exactly transcribed Asterisk texts held for calibration


class MissingSourceError(RuntimeError):
    """A package the real corpus is built from cannot be fetched."""


class SourceHashError(MissingSourceError):
    """A fetched package file is not the pinned one (its SHA-256 differs)."""


@dataclass(frozen=True)
class Package:
    """One pinned package file: which client fetches it, and the exact file it must give."""

    manager: str  # "apt" or "pip"
    name: str
    version: str
    filename: str
    sha256: str
    licence: str
    # A wheel with compiled code has one file per platform; pinning the tag makes every
    # machine fetch the same file (the recordings are the same in all of them).
    platform: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"

    def command(self, into: Path) -> list[str]:
        """The command that fetches the file into ``into`` (run there: apt-get download
        writes to the working directory)."""
        if self.manager == "apt":
            return ["apt-get", "download", f"{self.name}={self.version}"]
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            "-d",
            str(into),
            f"{self.name}=={self.version}",
        ]
        return cmd + (["--platform", self.platform] if self.platform else [])

    def manual_command(self, folder: Path) -> str:
        """What a person types to fetch the file by hand (apt-get download writes to the
        current directory, hence the cd)."""
        if self.manager == "apt":
            return f"cd {shlex.quote(str(folder))} && apt-get update && apt-get download {self.name}={self.version}"
        platform = f" --platform {self.platform}" if self.platform else ""
        return (
            f"python -m pip download --no-deps --only-binary=:all:{platform} -d {shlex.quote(str(folder))} "
            f"{self.name}=={self.version}"
        )


ASTERISK_WAV = Package(
    "apt",
    "asterisk-core-sounds-en-wav",
    "1.6.1-1",
    "asterisk-core-sounds-en-wav_1.6.1-1_all.deb",
    "2be3ea287d83299d143815fa804f11179a75b7affd4a758b98b55f5afc18a35d",
    "CC-BY-SA-3.0",
)
ASTERISK_TEXT = Package(
    "apt",
    "asterisk-core-sounds-en",
    "1.6.1-1",
    "asterisk-core-sounds-en_1.6.1-1_all.deb",
    "973e797d28e37fa6ca3c0a9d6fa717e77cf1268ae916bf09fd3503113cdffa50",
    "CC-BY-SA-3.0",
)
MOONSHINE = Package(
    "pip",
    "moonshine-voice",
    "0.1.5",
    "moonshine_voice-0.1.5-py3-none-manylinux_2_34_x86_64.whl",
    "1ed9e0ccf94be4845d69e7fa862dcf4c8b5801a758796966494c694f48184496",
    "MIT",
    platform="manylinux_2_34_x86_64",
)
PACKAGES: tuple[Package, ...] = (ASTERISK_WAV, ASTERISK_TEXT, MOONSHINE)

_ASTERISK_DIR = "usr/share/asterisk/sounds/en_US_f_Allison/"
_ASTERISK_TRANSCRIPTS = "usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz"
_ASTERISK_SPEAKER = "asterisk/allison-smith"

# Spelling mistakes of core-sounds-en.txt: the reference must be what was said, correctly
# spelled, or every model is charged a word error for it.
_TYPOS = {
    "exclaimation": "exclamation",
    "fourtieth": "fortieth",
    "represenatives": "representatives",
    "umute": "unmute",
    "indentified": "identified",
    "witheld": "withheld",
    "thru": "through",
}

# Prompts whose transcript is not a reliable WER reference, with why: they may calibrate
# (only their audio is used there) but never test. Found by reading every transcript and
# by an ASR check of every recording against it.
_SPELLING = "the spoken form has no agreed spelling (letters, an acronym or a product name)"
_MISSING_WORD = "the recording appears to say a word that the transcript lacks"
_DOUBTFUL: dict[str, str] = {
    "digits/a-m": _SPELLING,
    "digits/p-m": _SPELLING,
    "spy-dahdi": _SPELLING,
    "spy-h323": _SPELLING,
    "spy-iax": _SPELLING,
    "spy-iax2": _SPELLING + "; the transcript notes the file does not say its '2'",
    "spy-nbs": _SPELLING,
    "demo-moreinfo": _SPELLING + " ('www.asterisk.org')",
    "pbx-invalid": _MISSING_WORD + " ('i am sorry but')",
    "pbx-invalidpark": _MISSING_WORD + " ('i am sorry but')",
    "basic-pbx-ivr-main": _MISSING_WORD + " ('provider of the perfect products')",
    "queue-callswaiting": "the recording appears to say 'representatives', the transcript 'a representative'",
    "queue-quantity2": "the recording appears to say 'representatives', the transcript 'a representative'",
}


@dataclass(frozen=True)
class _Reading:
    """A span of a moonshine-voice recording and the text spoken in it."""

    member: str
    text: str
    speaker: str
    span: tuple[int, int] | None = None  # [start, end) in the file's own samples; None: all


_TWO_CITIES = "moonshine_voice/assets/two_cities.wav"
_MOONSHINE_READINGS: tuple[_Reading, ...] = (
    # The line quoted with this clip in moonshine's docs (Beckett, Worstward Ho).
    _Reading(
        "moonshine_voice/assets/beckett.wav",
        "Ever tried. Ever failed. No matter. Try again. Fail again. Fail better.",
        "moonshine-voice/beckett",
    ),
    # The novel's first paragraph (public domain), 44.4 s at 48 kHz, cut in the middle of
    # its three longest pauses (0.7-0.85 s below -30 dB of the peak, at 13.12 s, 20.85 s
    # and 28.69 s) so each reading fits Whisper's window.
    _Reading(
        _TWO_CITIES,
        "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
        "age of foolishness, it was the epoch of belief, it was the epoch of incredulity,",
        "moonshine-voice/two-cities",
        (0, 629_760),
    ),
    _Reading(
        _TWO_CITIES,
        "it was the season of Light, it was the season of Darkness, it was the spring of hope, it "
        "was the winter of despair,",
        "moonshine-voice/two-cities",
        (629_760, 1_000_800),
    ),
    _Reading(
        _TWO_CITIES,
        "we had everything before us, we had nothing before us, we were all going direct to Heaven, "
        "we were all going direct the other way",
        "moonshine-voice/two-cities",
        (1_000_800, 1_377_120),
    ),
    _Reading(
        _TWO_CITIES,
        "in short, the period was so far like the present period, that some of its noisiest "
        "authorities insisted on its being received, for good or for evil, in the superlative degree of "
        "comparison only.",
        "moonshine-voice/two-cities",
        (1_377_120, 2_129_958),
    ),
)
_MOONSHINE_LEFT_OUT = {
    "moonshine_voice/assets/endgame_nagg_nell.wav": "synthetic: upstream made it with ZipVoice TTS",
    "moonshine_voice/assets/clone-test.wav": "no transcript: the one in moonshine's docs is of another clip",
    "moonshine_voice/assets/success.wav": "not speech (an earcon)",
    "moonshine_voice/assets/error.wav": "not speech (an earcon)",
}


# ---------------------------------------------------------------------------- transcripts

_NOTES = re.compile(r"\[[^\]]*\]|\([^)]*\)|<[^>]*>|\{[^}]*\}")
# Telephone prompts read these symbols as words ("press star", "press pound").
_SYMBOLS = {"&": " and ", "*": " star ", "#": " pound ", "%": " percent "}
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SCALES = ((10**9, "billion"), (10**6, "million"), (10**3, "thousand"))


def number_words(n: int) -> str:
    """``n`` (0 <= n < 10**12) in English words without "and": 305 -> "three hundred five"."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, rest = divmod(n, 10)
        return _TENS[tens] + (f" {_ONES[rest]}" if rest else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {number_words(rest)}" if rest else "")
    for scale, word in _SCALES:
        if n >= scale:
            head, rest = divmod(n, scale)
            return f"{number_words(head)} {word}" + (f" {number_words(rest)}" if rest else "")
    raise ValueError(f"{n} is out of range")


def _spell_number(match: re.Match[str]) -> str:
    whole, _, fraction = match.group().partition(".")
    # Leading zeros and very long strings are read digit by digit (codes, not amounts).
    if (len(whole) > 1 and whole.startswith("0")) or len(whole) > 12:
        words = " ".join(_ONES[int(d)] for d in whole)
    else:
        words = number_words(int(whole))
    if fraction:
        words += " point " + " ".join(_ONES[int(d)] for d in fraction)
    return f" {words} "


def normalize_transcript(text: str) -> str:
    """Lower-case words of ``[a-z']`` separated by single spaces: notes in brackets,
    parentheses or angle brackets removed, accents folded, numbers spelled out, other
    punctuation dropped, apostrophes kept only inside words ("party's", "o'clock").
    Idempotent, so normalising a reference twice never changes it."""
    text = unicodedata.normalize("NFKD", text).lower()
    text = text.encode("ascii", "ignore").decode("ascii")
    text = _NOTES.sub(" ", text)
    for symbol, word in _SYMBOLS.items():
        text = text.replace(symbol, word)
    text = _NUMBER.sub(_spell_number, text)
    text = re.sub(r"[^a-z' ]", " ", text)
    text = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", text)
    return " ".join(text.split())


def _corrected(words: str) -> str:
    return " ".join(_TYPOS.get(w, w) for w in words.split())


def parse_transcripts(data: bytes) -> dict[str, str]:
    """``core-sounds-en.txt`` -> {sound name: transcript as written}. Lines are
    ``name: text``; ``;`` starts a comment."""
    out: dict[str, str] = {}
    for line in data.decode("utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith(";"):
            continue
        name, sep, text = line.partition(":")
        if sep:
            out[name.strip()] = text.strip()
    return out


# ------------------------------------------------------------------------------- fetching


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MissingSourceError(f"{shlex.join(cmd)} could not run ({exc})") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise MissingSourceError(f"{shlex.join(cmd)} exited {proc.returncode}: {' / '.join(tail)}")


def _download(package: Package, into: Path) -> None:
    """Runs the package client; raises MissingSourceError when it fails. A fresh machine
    may have no apt lists yet (apt-get download then finds no candidate): as root, the
    lists are refreshed once and the download retried, as scripts/setup.sh does for its
    own packages."""
    try:
        _run(package.command(into), into)
    except MissingSourceError:
        if package.manager != "apt" or os.geteuid() != 0:
            raise
        log.warning("apt-get download %s=%s failed: running apt-get update and retrying", package.name, package.version)
        _run(["apt-get", "update", "-q"], into)
        _run(package.command(into), into)


def fetch_package(package: Package, downloads: Path | None = None) -> Path:
    """The package file in ``downloads`` (default ``cache_root()/downloads``), fetched when
    absent and always checked against its pinned SHA-256. A cached file that differs is
    fetched again; a fetched file that differs is deleted and SourceHashError raised."""
    downloads = downloads or cache_root() / "downloads"
    path = downloads / package.filename
    if path.exists():
        if _sha256_file(path) == package.sha256:
            return path
        log.warning("%s in %s does not match its pinned SHA-256: fetched again", package.filename, downloads)
        path.unlink()
    downloads.mkdir(parents=True, exist_ok=True)
    # A folder of its own: a failed or interrupted fetch leaves nothing at ``path``.
    tmp = Path(tempfile.mkdtemp(dir=downloads, prefix=f".{package.name}-"))
    try:
        try:
            _download(package, tmp)
        except MissingSourceError as exc:
            raise MissingSourceError(
                f"cannot fetch package {package.label} ({exc}). Fetch it by hand: "
                f"{package.manual_command(downloads)}  (file {package.filename}, SHA-256 {package.sha256})"
            ) from None
        got = tmp / package.filename
        if not got.exists():
            found = sorted(p.name for p in tmp.iterdir())
            raise MissingSourceError(
                f"fetching package {package.label} gave {found or 'no file'}, not {package.filename}. Fetch it by "
                f"hand: {package.manual_command(downloads)}"
            )
        digest = _sha256_file(got)
        if digest != package.sha256:
            got.unlink()
            raise SourceHashError(
                f"package {package.label}: {package.filename} has SHA-256 {digest}, pinned {package.sha256}; "
                "the file was deleted. The archive now serves other bytes under this version: check them, then "
                "update the pin in esc_ao/corpus/real.py"
            )
        os.replace(got, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# ------------------------------------------------------------------------ reading sources


def _deb_members(path: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """Regular files of a .deb's data archive whose path (without "./") ``wanted`` accepts,
    read in Python: no dpkg, no install, the same on any system."""
    data = path.read_bytes()
    if data[:8] != b"!<arch>\n":
        raise ValueError(f"{path} is not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(data):
        name = data[pos : pos + 16].decode().strip().rstrip("/")
        size = int(data[pos + 48 : pos + 58].decode().strip())
        body = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            out = {}
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                for member in tar:
                    key = member.name.removeprefix("./")
                    if member.isfile() and wanted(key):
                        f = tar.extractfile(member)
                        assert f is not None
                        out[key] = f.read()
            return out
    raise ValueError(f"{path} has no data.tar member")


def _read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """WAV bytes -> (int16 mono samples, sample rate)."""
    with wave.open(io.BytesIO(data), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"expected 16-bit PCM, got {8 * w.getsampwidth()}-bit")
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        channels, rate = w.getnchannels(), w.getframerate()
    if channels > 1:
        pcm = np.round(pcm.reshape(-1, channels).astype(np.float64).mean(axis=1)).astype("<i2")
    return pcm, rate


@dataclass(frozen=True)
class _Recording:
    """One utterance as shipped: where it came from, what it says, its samples."""

    package: Package
    original: str
    transcript: str  # as the source writes it
    text: str  # normalised
    speaker: str
    pcm: np.ndarray
    rate: int
    span: tuple[int, int] | None = None

    @property
    def key(self) -> str:
        span = f"#{self.span[0]}-{self.span[1]}" if self.span else ""
        return f"{self.package.name}:{self.original}{span}"


def _asterisk(wav_deb: Path, text_deb: Path) -> tuple[list[_Recording], list[dict[str, str]]]:
    members = _deb_members(wav_deb, lambda p: p.startswith(_ASTERISK_DIR) and p.endswith(".wav"))
    docs = _deb_members(text_deb, lambda p: p == _ASTERISK_TRANSCRIPTS)
    transcripts = parse_transcripts(gzip.decompress(docs[_ASTERISK_TRANSCRIPTS]))
    recordings, excluded = [], []
    for member in sorted(members):
        name = member[len(_ASTERISK_DIR) : -len(".wav")]
        original = member.removeprefix("usr/share/asterisk/sounds/")
        transcript = transcripts.get(name)
        if transcript is None:
            excluded.append({"package": ASTERISK_WAV.name, "original": original, "reason": "no transcript"})
            continue
        text = _corrected(normalize_transcript(transcript))
        if not text:  # only notes such as "[beep]" or "(1 second of silence)"
            excluded.append(
                {
                    "package": ASTERISK_WAV.name,
                    "original": original,
                    "reason": f"not speech (transcript {transcript!r})",
                }
            )
            continue
        pcm, rate = _read_wav(members[member])
        recordings.append(_Recording(ASTERISK_WAV, original, transcript, text, _ASTERISK_SPEAKER, pcm, rate))
    return recordings, excluded


def _moonshine(wheel: Path) -> tuple[list[_Recording], list[dict[str, str]]]:
    recordings = []
    with zipfile.ZipFile(wheel) as z:
        for reading in _MOONSHINE_READINGS:
            pcm, rate = _read_wav(z.read(reading.member))
            if reading.span:
                pcm = pcm[reading.span[0] : reading.span[1]]
            recordings.append(
                _Recording(
                    MOONSHINE,
                    reading.member,
                    reading.text,
                    normalize_transcript(reading.text),
                    reading.speaker,
                    pcm,
                    rate,
                    reading.span,
                )
            )
    excluded = [{"package": MOONSHINE.name, "original": m, "reason": r} for m, r in _MOONSHINE_LEFT_OUT.items()]
    return recordings, excluded


# ------------------------------------------------------------------------------- planning

_CARDINALS = frozenset(_ONES) | frozenset(_TENS[2:]) | {"oh", "hundred", "thousand", "million", "billion"}


def _set_of(rec: _Recording) -> str:
    if rec.package != ASTERISK_WAV:
        return "readings"
    words = rec.text.split()
    if len(words) > 1:
        return "prompts"
    if rec.original.startswith("en_US_f_Allison/letters/") and len(words[0]) == 1:
        return "letters"
    return "digits" if words[0] in _CARDINALS else "words"


def _doubt(rec: _Recording) -> str | None:
    """Why ``rec``'s transcript is no test reference (see _DOUBTFUL), None when it is one."""
    if rec.package != ASTERISK_WAV:
        return None
    return _DOUBTFUL.get(rec.original.removeprefix("en_US_f_Allison/").removesuffix(".wav"))


def _calibration_only(rec: _Recording) -> bool:
    return rec.package != ASTERISK_WAV or _doubt(rec) is not None


def _hash_share(text: str) -> int:
    """0-99 from the text alone: a split rule that one item's change never propagates."""
    return int.from_bytes(hashlib.sha256(f"{SEED}:{text}".encode()).digest()[:8], "big") % 100


def _assign(recordings: Sequence[_Recording]) -> dict[str, str]:
    """{recording key: split}. A text goes to calibration when any recording of it must
    (doubtful or not Asterisk) or when its hash falls in the calibration share."""
    forced = {r.text for r in recordings if _calibration_only(r)}
    return {
        r.key: "calibration" if r.text in forced or _hash_share(r.text) < CALIBRATION_PERCENT else "test"
        for r in recordings
    }


def _plan(recordings: Sequence[_Recording], excluded: list[dict[str, str]]) -> list[tuple[dict[str, Any], _Recording]]:
    """Manifest entries (no audio hash yet) paired with their recordings, in id order;
    recordings over MAX_SECONDS are added to ``excluded``."""
    kept = []
    for rec in recordings:
        seconds = len(rec.pcm) / rec.rate
        if seconds > MAX_SECONDS:
            excluded.append(
                {
                    "package": rec.package.name,
                    "original": rec.original,
                    "reason": f"{seconds:.1f} s, longer than {MAX_SECONDS:.0f} s (Whisper's window)",
                }
            )
        else:
            kept.append(rec)
    splits = _assign(kept)
    order = sorted(kept, key=lambda r: (("calibration", "test").index(splits[r.key]), r.key))
    planned = []
    for i, rec in enumerate(order):
        split, subset = splits[rec.key], _set_of(rec)
        samples = _resampled_length(len(rec.pcm), rec.rate)
        entry = {
            "id": f"{split}-{i:04d}",
            "split": split,
            "set": subset,
            "text": rec.text,
            "label": rec.text if subset in ("words", "digits", "letters") else subset,
            "n_words": len(rec.text.split()),
            "voice": rec.speaker,
            "speaker": rec.speaker,
            "transcript": rec.transcript,
            "package": rec.package.name,
            "package_version": rec.package.version,
            "licence": rec.package.licence,
            "original": rec.original,
            "original_rate": rec.rate,
            "span": list(rec.span) if rec.span else None,
            "doubtful": _doubt(rec),
            "sample_rate": SAMPLE_RATE,
            "samples": samples,
            "duration_s": round(samples / SAMPLE_RATE, 4),
            "file": f"{split}/{split}-{i:04d}.wav",
        }
        planned.append((entry, rec))
    return planned


def _resampled_length(n: int, rate: int) -> int:
    # torchaudio's resample returns ceil(n * new / old) samples.
    return -(-n * SAMPLE_RATE // rate)


def _sources(root: Path) -> tuple[list[_Recording], list[dict[str, str]], dict[str, dict[str, Any]]]:
    downloads = root / "downloads"
    paths = {p.name: fetch_package(p, downloads) for p in PACKAGES}
    asterisk, excluded = _asterisk(paths[ASTERISK_WAV.name], paths[ASTERISK_TEXT.name])
    readings, left_out = _moonshine(paths[MOONSHINE.name])
    sources = {
        p.name: {
            "manager": p.manager,
            "version": p.version,
            "file": p.filename,
            "sha256": p.sha256,
            "licence": p.licence,
        }
        for p in PACKAGES
    }
    return asterisk + readings, excluded + left_out, sources


def plan_real_corpus(root: Path | None = None) -> list[dict[str, Any]]:
    """Every item the corpus would hold (manifest entries without audio hashes), from the
    packages alone: fetches them if needed, renders nothing."""
    recordings, excluded, _ = _sources(root or cache_root())
    return [entry for entry, _ in _plan(recordings, excluded)]


# ------------------------------------------------------------------------------ building


def source_digest() -> str:
    """Hash (16 hex digits) of what the corpus holds: the pinned package files, the tables
    and settings that pick, transcribe and split the items, and ``PLAN_VERSION``. Needs no
    download and no build. Like the TTS corpora's plan digest it leaves out the rendered
    bytes (resampling rounds differently between CPUs); a change of the rules in code bumps
    ``PLAN_VERSION``."""
    payload = json.dumps(
        {
            "plan_version": PLAN_VERSION,
            "name": CORPUS_NAME,
            "packages": [[p.name, p.version, p.filename, p.sha256] for p in PACKAGES],
            "seed": SEED,
            "calibration_percent": CALIBRATION_PERCENT,
            "max_seconds": MAX_SECONDS,
            "sample_rate": SAMPLE_RATE,
            "typos": _TYPOS,
            "doubtful": sorted(_DOUBTFUL),
            "readings": [asdict(r) for r in _MOONSHINE_READINGS],
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def real_fingerprint() -> str:
    """Changes with the pinned packages, the split rule, this module's code and torchaudio
    (whose resampler makes the audio)."""
    payload = json.dumps(
        {
            "format": FORMAT,
            "name": CORPUS_NAME,
            "packages": [asdict(p) for p in PACKAGES],
            "seed": SEED,
            "calibration_percent": CALIBRATION_PERCENT,
            "max_seconds": MAX_SECONDS,
            "sample_rate": SAMPLE_RATE,
            "render_threads": RENDER_THREADS,
            "torchaudio": torchaudio.__version__,
            "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _render(rec: _Recording) -> bytes:
    """16 kHz WAV bytes on ``RENDER_THREADS`` torch threads: the resampler rounds
    differently with another thread count, and the corpus must not depend on the machine."""
    prev = torch.get_num_threads()
    torch.set_num_threads(RENDER_THREADS)
    try:
        audio = torch.from_numpy(rec.pcm.astype(np.float32) / 32768.0)
        if rec.rate != SAMPLE_RATE:
            audio = AF.resample(audio, rec.rate, SAMPLE_RATE)
        pcm = np.clip(np.round(audio.numpy() * 32768.0), -32768, 32767).astype("<i2")
    finally:
        torch.set_num_threads(prev)
    return _wav_bytes(pcm.tobytes())


def _sizes(items: Iterable[dict[str, Any]]) -> dict[str, dict[str, int]]:
    sizes: dict[str, dict[str, int]] = {"train": {}, "calibration": {}, "test": {}}
    for item in items:
        sizes[item["split"]][item["set"]] = sizes[item["split"]].get(item["set"], 0) + 1
    return sizes


def _spec(manifest: dict[str, Any]) -> CorpusSpec:
    # No TTS voices: the spec only names the corpus and its sizes for Corpus's users.
    return CorpusSpec(manifest["corpus"], "asr", manifest["sizes"], seed=SEED, train_voices=(), test_only_voices=())


def _build(root: Path, folder: Path, fingerprint: str) -> dict[str, Any]:
    recordings, excluded, sources = _sources(root)
    planned = _plan(recordings, excluded)
    tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for split in ("calibration", "test"):
        (tmp / split).mkdir(parents=True)
    items = []
    for entry, rec in planned:
        wav = _render(rec)
        (tmp / entry["file"]).write_bytes(wav)
        entry["sha256"] = hashlib.sha256(wav).hexdigest()
        items.append(entry)
    manifest = {
        "format": FORMAT,
        "corpus": folder.name,
        "kind": "asr",
        "fingerprint": fingerprint,
        "seed": SEED,
        "sample_rate": SAMPLE_RATE,
        "max_seconds": MAX_SECONDS,
        "calibration_percent": CALIBRATION_PERCENT,
        "sources": sources,
        "sizes": _sizes(items),
        "excluded": sorted(excluded, key=lambda e: (e["package"], e["original"])),
        "items": items,
    }
    return publish(tmp, folder, manifest)


def load_real_corpus(name: str = CORPUS_NAME, root: Path | None = None) -> Corpus:
    """The real-speech corpus from ``root`` (default ``cache_root()``), built when absent,
    stale, corrupt or partial (a warning says why), never used unverified."""
    if name != CORPUS_NAME:
        raise ValueError(f"real corpus {name!r} is unknown: use {CORPUS_NAME!r}")
    root = root or cache_root()
    folder = root / "corpora" / name
    fingerprint = real_fingerprint()
    problem = verify(folder, fingerprint)
    if problem is None:
        manifest = json.loads((folder / "manifest.json").read_text())
    else:
        if folder.exists():
            log.warning("corpus %s at %s is rebuilt: %s", name, folder, problem)
        manifest = _build(root, folder, fingerprint)
    return Corpus(_spec(manifest), folder, manifest)


def keyword_clips(corpus: Corpus, split: str, vocabulary: Iterable[str] | None = None) -> list[Utterance]:
    """The one-word clips of ``split`` (label = the word), only those in ``vocabulary`` if
    given: e.g. the Speech Commands keywords a KWS model knows."""
    allowed = None if vocabulary is None else set(vocabulary)
    return [
        u for u in corpus.utterances(split) if u.meta.get("n_words") == 1 and (allowed is None or u.text in allowed)
    ]
