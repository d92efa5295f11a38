"""torchaudio's Conformer in a form torch.export accepts.

torchaudio builds the padding mask with ``int(torch.max(lengths).item())``, a
data-dependent value export cannot trace (pytorch issues 139610, 141551). Here the mask
is derived from the input's static time dimension instead, which gives the same mask
whenever max(lengths) == T (true for any padded batch).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torchaudio.models import Conformer

from esc_ao.speech.attention import SplitHeadAttention

__all__ = ["ExportableConformer"]


class ExportableConformer(nn.Module):
    """Wraps a ``torchaudio.models.Conformer``: (x (B, T, D), lengths (B,) or None) -> (B, T, D).

    Shares the wrapped model's layers (no copy of the weights). With
    ``split_attention=True`` each layer's ``nn.MultiheadAttention`` is replaced (in a
    shallow copy of the layer; the wrapped model is untouched) by ``SplitHeadAttention``,
    the same function in ops the XNNPACK delegate runs; it then takes no padding mask.
    """

    def __init__(self, conformer: Conformer, split_attention: bool = False) -> None:
        super().__init__()
        layers = conformer.conformer_layers
        if split_attention:
            layers = nn.ModuleList(_with_split_attention(layer) for layer in layers)
        self.conformer_layers = layers

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        # lengths=None: every sequence is full length. No mask then, rather than an
        # all-False one: the mask ops would run outside the XNNPACK delegate.
        padding_mask = None
        if lengths is not None:
            steps = torch.arange(x.shape[1], device=x.device)
            padding_mask = steps[None, :] >= lengths[:, None]  # (B, T), True where padded
        x = x.transpose(0, 1)
        for layer in self.conformer_layers:
            x = layer(x, padding_mask)
        return x.transpose(0, 1)


def _with_split_attention(layer: nn.Module) -> nn.Module:
    new = copy.copy(layer)
    new._modules = dict(layer._modules)
    attention = layer.self_attn
    assert isinstance(attention, nn.MultiheadAttention), type(attention)  # torchaudio's ConformerLayer
    new.self_attn = SplitHeadAttention(attention)
    return new


class ConvSubsampling(nn.Module):
    """Two stride-2 3x3 convolutions (4x fewer frames) and a projection: (B, T, F) -> (B, T', D)."""

    def __init__(self, n_mels: int, dim: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, dim, 3, 2), nn.ReLU(), nn.Conv2d(dim, dim, 3, 2), nn.ReLU())
        self.proj = nn.Linear(dim * (((n_mels - 1) // 2 - 1) // 2), dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        b, t, f = feats.shape
        # reshape, not unsqueeze(1): XNNPACK takes unsqueeze on the trailing dim only.
        x = self.conv(feats.reshape(b, 1, t, f))
        b, c, t, f = x.shape
        return self.proj(x.permute(0, 2, 1, 3).reshape(b, t, c * f))


class ConformerCTC(nn.Module):
    """Conformer-CTC: fbank (B, T, n_mels) -> CTC logits (B, T/4, vocab).

    Logits, not log-probabilities: greedy CTC decoding needs only the argmax, the loss
    applies log_softmax itself, and the deployed graph then ends inside the delegate
    (XNNPACK has no log_softmax).

    The defaults are the 8.4M-parameter model of the speed target (16 layers, d=144,
    4 heads, FFN 576, depthwise kernel 31; the Conformer-S shape) with a 32-symbol head.
    Full-length sequences only (no padding mask), which is what streaming-free
    inference on one utterance needs and what keeps the graph inside the XNNPACK delegate.
    """

    def __init__(
        self,
        n_mels: int = 80,
        dim: int = 144,
        heads: int = 4,
        ffn: int = 576,
        layers: int = 16,
        kernel: int = 31,
        vocab: int = 32,
        split_attention: bool = True,
    ) -> None:
        super().__init__()
        self.front = ConvSubsampling(n_mels, dim)
        self.encoder = ExportableConformer(Conformer(dim, heads, ffn, layers, kernel), split_attention)
        self.head = nn.Linear(dim, vocab)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``lengths`` (B,) frame counts of a padded batch (training); it needs the model
        built with ``split_attention=False``."""
        sub = None if lengths is None else self.output_lengths(lengths)
        return self.head(self.encoder(self.front(feats), sub))

    @staticmethod
    def output_lengths(lengths: torch.Tensor) -> torch.Tensor:
        """Frames after the two unpadded stride-2 3x3 convolutions."""
        return ((lengths - 3) // 2 + 1 - 3) // 2 + 1

    def split_attention_(self) -> "ConformerCTC":
        """Switches (in place) to SplitHeadAttention for export, after training with masks."""
        self.encoder.conformer_layers = nn.ModuleList(
            _with_split_attention(layer) for layer in self.encoder.conformer_layers
        )
        return self
