"""Self-attention written with the ops XNNPACK delegates.

``nn.MultiheadAttention`` exports through ``F.multi_head_attention_forward``: one packed
in-projection, then unflatten/unsqueeze/select/expand to split q, k and v, and a
``mul.Scalar`` for the 1/sqrt(d) scaling. ExecuTorch's XNNPACK partitioner takes none of
those (unsqueeze only on the trailing dimension; no select, expand or mul.Scalar
config), so each attention block fell out of the delegate and cut it in pieces.
``SplitHeadAttention`` computes the same function with three linears (the scaling
folded into the query projection), view, permute, bmm and softmax: all delegated.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SplitHeadAttention"]


class SplitHeadAttention(nn.Module):
    """Drop-in for a (batch_first=False) ``nn.MultiheadAttention`` used as self-attention
    without masks or returned weights (what speech encoders at inference do)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if mha.batch_first or not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(
                "SplitHeadAttention needs a batch_first=False nn.MultiheadAttention with one "
                "embed dim for q, k, v and no bias_k / add_zero_attn"
            )
        d, self.heads = mha.embed_dim, mha.num_heads
        self.head_dim = d // self.heads
        scale = 1.0 / math.sqrt(self.head_dim)
        w = mha.in_proj_weight.detach()
        b = mha.in_proj_bias.detach() if mha.in_proj_bias is not None else torch.zeros(3 * d)
        self.q, self.k, self.v = (nn.Linear(d, d) for _ in range(3))
        with torch.no_grad():
            self.q.weight.copy_(w[:d] * scale)
            self.q.bias.copy_(b[:d] * scale)
            self.k.weight.copy_(w[d : 2 * d]), self.k.bias.copy_(b[d : 2 * d])
            self.v.weight.copy_(w[2 * d :]), self.v.bias.copy_(b[2 * d :])
        self.out_proj = mha.out_proj

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        **_: object,
    ) -> tuple[torch.Tensor, None]:
        if key_padding_mask is not None:
            raise ValueError(
                "SplitHeadAttention has no padding mask: pass full-length sequences "
                "(lengths=None) or use the original nn.MultiheadAttention"
            )
        t, b, d = query.shape

        def heads(x: torch.Tensor) -> torch.Tensor:  # (T, B, D) -> (B*H, T, hd)
            return x.reshape(t, b * self.heads, self.head_dim).permute(1, 0, 2)

        q, k, v = heads(self.q(query)), heads(self.k(key)), heads(self.v(value))
        probs = torch.softmax(torch.bmm(q, k.permute(0, 2, 1)), dim=-1)
        ctx = torch.bmm(probs, v).permute(1, 0, 2).reshape(t, b, d)
        return self.out_proj(ctx), None
