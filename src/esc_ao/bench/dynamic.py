"""Dynamic int8 activations: what ExecuTorch users of Whisper pick instead of static
calibration (optimum-executorch's ``--qlinear 8da8w`` / ``8da4w``), as rows of the accuracy
table next to the static methods.

The scheme is torchao's ``Int8DynamicActivationIntxWeightConfig`` applied with ``quantize_``
to every ``nn.Linear`` of a deep copy of each part's float model, with the config's defaults
(torchao 0.18) except the weight dtype and granularity:

- activations: the input of each linear is quantized at run time, per token (one grid per
  row of the last dimension), asymmetric int8 over [min(x, 0), max(x, 0)]:
  ``scale = (max - min) / 255``, ``zero_point = -128 - round(min / scale)``; nothing is
  calibrated, so no calibration set or method plays any part;
- weights, symmetric with zero point 0 (scale = absmax / 127.5 on [-128, 127], or
  absmax / 7.5 on [-8, 7]; torchao's symmetric mapping):
  ``w8a8`` ("8da8w"): int8 per output channel; ``w4a8`` ("8da4w"): int4 in groups of 32
  input features. A linear whose input width is not a multiple of 32 (the Conformer's 144)
  gets int4 per output channel instead, as optimum-executorch's per-axis fallback
  (``--qlinear 8da4w,8da4w``) does; without that fallback it would stay float and the
  row would not be a 4-bit model;
- there is no ``w4a4``: dynamic activations are 8-bit.

Everything else stays float, as in ExecuTorch's Whisper export (optimum-executorch
quantizes the linears of ``model.decoder`` with ``--qlinear`` and of ``model.encoder`` with
``--qlinear_encoder``, nothing else; both parts are quantized here): convolutions,
attention matmuls, softmax, LayerNorm, residual adds, embeddings. That includes Whisper's
output projection: ``WhisperTextStep`` computes it as ``F.linear`` on the token embedding's
weight (there is no ``nn.Linear`` to quantize), and in the Hugging Face model it is
``proj_out``, which sits outside ``model.decoder`` and so stays float there too. It holds
a third to a half of Whisper's weights (base 36 %, tiny.en 54 %), so these rows are larger
than the static ones, which quantize it.

torchao's config runs on CPU in eager mode (its ``IntxUnpackedToInt8Tensor`` weight
quantizes the input, dequantizes both and calls float ``F.linear``), so it is used as is
rather than reimplemented: the rows measure the numbers users get from torchao. Not
reproduced: optimum-executorch's default weight qparams since 2026 are HQQ's
(``intx_choose_qparams_algorithm="hqq_scale_only"``, a fitted scale); these rows use
torchao's default affine choice (absmax), which a hand-written reference pins
(tests/test_dynamic.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from esc_ao.config import METHODS

if TYPE_CHECKING:  # kept out of the import: the CLI and the table read DYNAMIC_METHOD only
    from esc_ao.bench.tasks import Forward, Task

__all__ = [
    "BENCH_METHODS",
    "DYNAMIC_BITS",
    "DYNAMIC_METHOD",
    "GROUP_SIZE",
    "DynamicSizes",
    "dynamic_forwards",
    "dynamic_sizes",
    "quantize_linears",
]

DYNAMIC_METHOD = "dynamic"
# The accuracy table's methods in row order: the calibration methods (QuantConfig's
# observers), then the calibration-free alternative.
BENCH_METHODS: tuple[str, ...] = METHODS + (DYNAMIC_METHOD,)
DYNAMIC_BITS: dict[str, int] = {"w8a8": 8, "w4a8": 4}  # bits -> weight bits; activations are int8
GROUP_SIZE = 32  # int4 weights: optimum-executorch's default --qlinear_group_size


@dataclass(frozen=True)
class DynamicSizes:
    """The quantized linear weights of a model (each counted once): their bytes in float32
    and quantized (``bits / 8`` per weight plus one float32 scale per channel or group,
    as esc_ao.report.weight_bytes counts the static rows), and how many linears took
    each weight granularity."""

    float_bytes: int
    quant_bytes: int
    per_channel: int
    per_group: int


def _weight_bits(bits: str) -> int:
    if bits not in DYNAMIC_BITS:
        raise ValueError(
            f"dynamic quantization at {bits!r} does not exist: activations are dynamic int8, "
            f"use one of {', '.join(DYNAMIC_BITS)}"
        )
    return DYNAMIC_BITS[bits]


def _group_size(linear: nn.Linear, weight_bits: int) -> int | None:
    """Input features per weight scale: None for one scale per output channel."""
    if weight_bits == 4 and linear.in_features % GROUP_SIZE == 0:
        return GROUP_SIZE
    return None


def _config(weight_bits: int, group: int | None) -> Any:
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    return Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int8 if weight_bits == 8 else torch.int4,  # type: ignore[attr-defined]  # torch's stubs lack int4
        weight_granularity=PerAxis(0) if group is None else PerGroup(group),
    )


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def quantize_linears(model: nn.Module, bits: str) -> nn.Module:
    """Quantizes ``model``'s linears in place ("w8a8" or "w4a8", see the module docstring)
    and returns it. Raises ValueError for any other ``bits``."""
    from torchao.quantization import quantize_

    weight_bits = _weight_bits(bits)
    plan = {name: _group_size(m, weight_bits) for name, m in _linears(model).items()}
    for group in sorted(set(plan.values()), key=lambda g: g or 0):
        chosen = {name for name, g in plan.items() if g == group}
        quantize_(model, _config(weight_bits, group), filter_fn=lambda m, fqn, chosen=chosen: fqn in chosen)
    return model


def dynamic_forwards(task: Task, bits: str) -> dict[str, Forward]:
    """One forward per part of ``task``: a deep copy of the part's float model with its
    linears quantized (the float model is left untouched)."""
    _weight_bits(bits)  # fail before copying anything
    return {part.name: quantize_linears(copy.deepcopy(part.model), bits) for part in task.parts}


def dynamic_sizes(task: Task, bits: str) -> DynamicSizes:
    """The sizes of the linear weights ``dynamic_forwards`` quantizes, over all parts,
    each weight counted once (Whisper's two parts share the cross-attention linears)."""
    weight_bits = _weight_bits(bits)
    seen: set[int] = set()
    n_float = n_quant = per_channel = per_group = 0
    for part in task.parts:
        for linear in _linears(part.model).values():
            if id(linear.weight) in seen:
                continue
            seen.add(id(linear.weight))
            group = _group_size(linear, weight_bits)
            n = linear.weight.numel()
            scales = linear.out_features if group is None else n // group
            n_float += 4 * n
            n_quant += (n * weight_bits + 7) // 8 + 4 * scales
            per_channel, per_group = per_channel + (group is None), per_group + (group is not None)
    return DynamicSizes(n_float, n_quant, per_channel, per_group)
