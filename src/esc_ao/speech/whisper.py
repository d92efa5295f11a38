"""openai-whisper models in an export-friendly form, and their log-mel input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from whisper.audio import log_mel_spectrogram, pad_or_trim
from whisper.model import AudioEncoder, TextDecoder, Whisper

__all__ = ["WhisperAudio", "WhisperDecoderForScoring", "WhisperEncoder", "WhisperTextStep", "whisper_mel"]


def whisper_mel(audio: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """(samples,) 16 kHz audio -> (1, n_mels, 3000) log-mel, padded/trimmed to 30 s as
    Whisper's encoder requires."""
    return log_mel_spectrogram(pad_or_trim(audio), n_mels=n_mels).unsqueeze(0)


class WhisperEncoder(nn.Module):
    """Whisper's audio encoder: (B, n_mels, 3000) log-mel -> (B, 1500, d) features.

    It exports as is; the wrapper exists so the encoder can be taken from a full model
    and named in reports.
    """

    def __init__(self, model: Whisper | AudioEncoder) -> None:
        super().__init__()
        self.encoder = model.encoder if isinstance(model, Whisper) else model

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.encoder(mel)


class WhisperDecoderForScoring(nn.Module):
    """Whisper's text decoder for teacher-forced scoring: (tokens (B, L), audio features
    (B, 1500, d)) -> logits (B, L, vocab), with no KV cache (every call sees the whole
    prefix, so the graph is static). The output projection tied to the token embedding is
    expressed as a linear so it is quantized per output channel like any other weight.
    """

    def __init__(self, model: Whisper | TextDecoder) -> None:
        super().__init__()
        self.decoder = model.decoder if isinstance(model, Whisper) else model

    def forward(self, tokens: torch.Tensor, audio_features: torch.Tensor) -> torch.Tensor:
        d = self.decoder
        x = d.token_embedding(tokens) + d.positional_embedding[: tokens.shape[-1]]
        for block in d.blocks:
            x = block(x, audio_features, mask=d.mask)
        x = d.ln(x)
        return F.linear(x, d.token_embedding.weight)


class WhisperAudio(nn.Module):
    """The audio half of Whisper for greedy decoding: log-mel (B, n_mels, 3000) -> the
    decoder's cross-attention keys and values (layers, B, 1500, d) each, computed once per
    utterance (the encoder plus every decoder block's cross-attention key/value linears)."""

    def __init__(self, model: Whisper) -> None:
        super().__init__()
        self.encoder = model.encoder
        self.keys = nn.ModuleList(b.cross_attn.key for b in model.decoder.blocks)
        self.values = nn.ModuleList(b.cross_attn.value for b in model.decoder.blocks)

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xa = self.encoder(mel)
        return torch.stack([k(xa) for k in self.keys]), torch.stack([v(xa) for v in self.values])


class WhisperTextStep(nn.Module):
    """The text half: (tokens (B, n), cross keys, cross values) -> logits (B, n, vocab) for
    every position, with the causal self-attention recomputed over the whole prefix (no
    KV cache, so the graph is one static function of n). Greedy decoding takes the last
    position; teacher-forced scoring (ESC's objective) uses all of them."""

    def __init__(self, model: Whisper) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(self, tokens: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        d = self.decoder
        x = d.token_embedding(tokens) + d.positional_embedding[: tokens.shape[-1]]
        for i, block in enumerate(d.blocks):
            a, h = block.attn, block.attn_ln(x)
            x = x + a.out(_attend(a.n_head, a.query(h), a.key(h), a.value(h), causal=True))
            cross = block.cross_attn
            x = x + cross.out(_attend(cross.n_head, cross.query(block.cross_attn_ln(x)), keys[i], values[i]))
            x = x + block.mlp(block.mlp_ln(x))
        return F.linear(d.ln(x), d.token_embedding.weight)


def _attend(n_head: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """openai-whisper's attention without SDPA (whose ``is_causal`` flag export cannot take
    from a symbolic length): (B, n, d) q and (B, m, d) k, v -> (B, n, d). The causal mask
    is a masked_fill, not whisper's add of a -inf matrix: an add is quantized (both
    inputs observed) and -inf cannot be put on an integer grid."""
    b, n, d = q.shape
    scale = (d // n_head) ** -0.25

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, t.shape[1], n_head, -1).permute(0, 2, 1, 3)

    qk = (heads(q) * scale) @ (heads(k) * scale).transpose(-1, -2)
    if causal:
        n = qk.shape[-1]
        qk = qk.masked_fill(torch.ones(n, n, dtype=torch.bool, device=qk.device).triu(1), float("-inf"))
    return (torch.softmax(qk, dim=-1) @ heads(v)).permute(0, 2, 1, 3).flatten(start_dim=2)
