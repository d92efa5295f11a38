"""Audio Spectrogram Transformer (Gong et al., 2021) at a size a 2-core machine handles.

128-bin fbank -> overlapping 16x16 patches (stride 10 in both axes, as in the AST paper)
-> linear patch embedding (a strided Conv2d) + [CLS] token + learned positions ->
pre-LayerNorm transformer encoder -> LayerNorm -> linear head on [CLS]. The defaults are
the DeiT-tiny shape (d=192, 12 layers, 3 heads) on 1 s of audio (100 frames), the
keyword-spotting setting of the AST paper. Attention uses q/k/v linears, bmm and softmax
so the exported graph stays inside the XNNPACK delegate.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AST"]


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.norm1(x)

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B*H, N, hd)
            return t.reshape(b, n, self.heads, self.head_dim).permute(0, 2, 1, 3).reshape(b * self.heads, n, -1)

        q = split(self.q(h) * self.head_dim**-0.5)
        probs = torch.softmax(torch.bmm(q, split(self.k(h)).permute(0, 2, 1)), dim=-1)
        ctx = torch.bmm(probs, split(self.v(h))).reshape(b, self.heads, n, -1).permute(0, 2, 1, 3).reshape(b, n, d)
        x = x + self.proj(ctx)
        return x + self.mlp(self.norm2(x))


class AST(nn.Module):
    """(B, frames, n_mels) fbank -> (B, classes) logits."""

    def __init__(
        self,
        classes: int = 37,
        n_mels: int = 128,
        frames: int = 100,
        dim: int = 192,
        layers: int = 12,
        heads: int = 3,
        mlp: int = 768,
        patch: int = 16,
        stride: int = 10,
    ) -> None:
        super().__init__()
        self.n_mels, self.frames = n_mels, frames
        self.patch = nn.Conv2d(1, dim, patch, stride)
        n_patches = ((n_mels - patch) // stride + 1) * ((frames - patch) // stride + 1)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n_patches + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        b, t, f = feats.shape
        if (t, f) != (self.frames, self.n_mels):
            raise ValueError(f"AST expects (B, {self.frames}, {self.n_mels}) fbank, got {tuple(feats.shape)}")
        # (B, 1, F, T): frequency x time image, as in the AST paper.
        x = self.patch(feats.permute(0, 2, 1).reshape(b, 1, f, t)).flatten(2).permute(0, 2, 1)
        # expand and select have no XNNPACK config: skip the expand when B == 1 (static
        # at export) and take [CLS] with a slice, so the graph stays in one delegate.
        cls = self.cls if b == 1 else self.cls.expand(b, -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, :1].reshape(b, -1))
