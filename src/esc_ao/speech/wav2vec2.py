"""torchaudio's wav2vec2 in an export-friendly form."""

from __future__ import annotations

import torch
from torch import nn
from torchaudio.models import Wav2Vec2Model

__all__ = ["ExportableWav2Vec2"]


class ExportableWav2Vec2(nn.Module):
    """(waveforms (B, samples)) -> emissions (B, frames, classes).

    torchaudio's forward returns ``(emissions, lengths)`` with ``lengths=None`` when no
    lengths are given; a single tensor output keeps the exported graph and the
    objectives simple. Unpadded batches only: with padding, pass lengths to the wrapped
    model instead.
    """

    def __init__(self, model: Wav2Vec2Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        emissions, _ = self.model(waveforms)
        return emissions
