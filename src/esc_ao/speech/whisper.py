"""openai-whisper models in an export-friendly form, and their log-mel input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from whisper.audio import log_mel_spectrogram, pad_or_trim
from whisper.model import AudioEncoder, TextDecoder, Whisper

__all__ = ["WhisperDecoderForScoring", "WhisperEncoder", "whisper_mel"]


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
