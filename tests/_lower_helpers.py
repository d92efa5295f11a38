"""Small seeded models shared by the lowering tests."""

from __future__ import annotations

import torch
from torch import nn

from esc_ao import EscQuantizer, QuantConfig, convert, export_model, observe, prepare
from esc_ao.speech import ConformerCTC


def tiny_ctc() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model = ConformerCTC(n_mels=40, dim=32, heads=2, ffn=64, layers=2, kernel=7, vocab=16).eval()
    return model, (torch.randn(1, 120, 40),)


def quantized(model: nn.Module, inputs: tuple, bits: int = 8, target: str = "xnnpack") -> torch.fx.GraphModule:
    torch.manual_seed(1)
    batches = [inputs] + [(torch.randn_like(inputs[0]),) for _ in range(2)]
    quantizer = EscQuantizer(QuantConfig(weight_bits=bits, act_bits=bits, method="mse"), target=target)
    prepared = prepare(export_model(model, inputs), quantizer)
    observe(prepared, batches)
    return convert(prepared)
