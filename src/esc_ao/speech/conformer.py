"""torchaudio's Conformer in a form torch.export accepts.

torchaudio builds the padding mask with ``int(torch.max(lengths).item())``, a
data-dependent value export cannot trace (pytorch issues 139610, 141551). Here the mask
is derived from the input's static time dimension instead, which gives the same mask
whenever max(lengths) == T (true for any padded batch).
"""

from __future__ import annotations

import torch
from torch import nn
from torchaudio.models import Conformer

__all__ = ["ExportableConformer"]


class ExportableConformer(nn.Module):
    """Wraps a ``torchaudio.models.Conformer``: (x (B, T, D), lengths (B,)) -> (B, T, D).

    Shares the wrapped model's layers (no copy of the weights).
    """

    def __init__(self, conformer: Conformer) -> None:
        super().__init__()
        self.conformer_layers = conformer.conformer_layers

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(x.shape[1], device=x.device)
        padding_mask = steps[None, :] >= lengths[:, None]  # (B, T), True where padded
        x = x.transpose(0, 1)
        for layer in self.conformer_layers:
            x = layer(x, padding_mask)
        return x.transpose(0, 1)
