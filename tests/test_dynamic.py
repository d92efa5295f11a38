"""The dynamic-activation rows (esc_ao.bench.dynamic): the scheme torchao computes, pinned
against a hand-written reference; what is quantized; and their cells in the accuracy bench."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_bench_accuracy import _task, stand_in  # noqa: F401  (stand_in is a fixture)
from torch import nn

from esc_ao.bench import accuracy as acc
from esc_ao.bench.dynamic import DYNAMIC_METHOD, DynamicSizes, dynamic_forwards, dynamic_sizes, quantize_linears
from esc_ao.bench.tasks import single_part


def _per_token_int8(x: torch.Tensor) -> torch.Tensor:
    """Asymmetric int8 fake quantization with one grid per row of the last dimension, over
    [min(x, 0), max(x, 0)]. torchao multiplies by 1 / scale rather than dividing: the two
    round differently at exact .5 ties, which occur."""
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=torch.finfo(x.dtype).smallest_normal)
    zero = (-128 - torch.round(lo / scale)).clamp(-128, 127)
    return ((torch.round(x * (1.0 / scale)) + zero).clamp(-128, 127) - zero) * scale


def _symmetric(w: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """Symmetric fake quantization, zero point 0, one scale per output channel (group None)
    or per ``group`` consecutive input features: scale = absmax / (2^(bits-1) - 0.5) on
    [-2^(bits-1), 2^(bits-1) - 1], so +absmax rounds to the clamped top value."""
    q = 2 ** (bits - 1)
    blocks = w.reshape(w.shape[0], -1, group or w.shape[1])
    scale = blocks.abs().amax(-1, keepdim=True) / (q - 0.5)
    return ((torch.round(blocks * (1.0 / scale))).clamp(-q, q - 1) * scale).reshape(w.shape)


@pytest.mark.parametrize(
    ("bits", "in_features", "weight_bits", "group"), [("w8a8", 64, 8, None), ("w4a8", 64, 4, 32), ("w4a8", 48, 4, None)]
)
def test_linear_is_per_token_int8_activations_times_quantized_weights(
    bits: str, in_features: int, weight_bits: int, group: int | None
) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 24)
    x = torch.randn(3, 5, in_features) * 2 + 0.5  # off-centre: the zero points are not 0
    with torch.no_grad():
        got = quantize_linears(nn.Sequential(linear), bits)(x)  # in place: linear is now quantized
        w = linear.weight.dequantize()
    from torchao.quantization import IntxUnpackedToInt8Tensor

    assert isinstance(linear.weight, IntxUnpackedToInt8Tensor)
    torch.manual_seed(0)
    ref = nn.Linear(in_features, 24)  # the same float weights again
    assert torch.equal(w, _symmetric(ref.weight.detach(), weight_bits, group))
    expected = F.linear(_per_token_int8(x), _symmetric(ref.weight.detach(), weight_bits, group), ref.bias.detach())
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert (got - ref(x)).abs().max() > 1e-4  # and it is not the float output


class _Mixed(nn.Module):
    """A conv, a LayerNorm and two linears: only the linears are to be quantized."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 16) -> (B, T, 4)
        x = self.norm(self.conv(x.transpose(1, 2)).transpose(1, 2))
        return self.fc2(torch.relu(self.fc1(x)))


def test_dynamic_forwards_quantize_a_copy_and_only_its_linears() -> None:
    torch.manual_seed(0)
    model = _Mixed().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = single_part("stand-in", "accuracy", model, [], lambda idx: None, lambda f: None, {})
    quantized = dynamic_forwards(task, "w8a8")["model"]
    assert quantized is not model
    assert all(type(p) is nn.Parameter for p in model.parameters())  # the float model is untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    kinds = {name: type(p.data).__name__ for name, p in quantized.named_parameters()}
    assert {n for n, k in kinds.items() if k != "Tensor"} == {"fc1.weight", "fc2.weight"}
    assert torch.equal(quantized.conv.weight, model.conv.weight) and torch.equal(quantized.fc1.bias, model.fc1.bias)
    x = torch.randn(2, 10, 16)
    with torch.no_grad():
        assert quantized(x).shape == (2, 10, 4) and not torch.equal(quantized(x), model(x))
    # sizes: w8a8 1 byte per weight + a float32 scale per output channel; w4a8 fc1 (16 inputs)
    # per channel, fc2 (32 inputs) in one group of 32 per channel
    assert dynamic_sizes(task, "w8a8") == DynamicSizes(4 * 640, 640 + 4 * (32 + 4), 2, 0)
    w4 = dynamic_sizes(task, "w4a8")
    assert (w4.quant_bytes, w4.per_channel, w4.per_group) == (256 + 4 * 32 + 64 + 4 * 4, 1, 1)


def test_w4a4_does_not_exist() -> None:
    task = _task(8, 0)
    for bits in ("w4a4", "w8a4"):
        with pytest.raises(
            ValueError,
            match=f"dynamic quantization at '{bits}' does not exist: activations are "
            "dynamic int8, use one of w8a8, w4a8",
        ):
            dynamic_forwards(task, bits)


def test_bench_writes_dynamic_cells_for_8_bit_activations_only(stand_in, tmp_path: Path) -> None:  # noqa: F811
    settings = acc.AccuracySettings(n_calibration=16)
    rows = acc.run_accuracy_bench(
        ["ast"], [DYNAMIC_METHOD], ["w8a8", "w4a8", "w4a4"], tmp_path / "out", tmp_path / "cells", settings
    )
    assert [(r["method"], r["bits"]) for r in rows] == [("float", "fp32"), ("dynamic", "w8a8"), ("dynamic", "w4a8")]
    assert len(list((tmp_path / "cells" / "ast" / "tts").glob("dynamic-*.json"))) == 2
    fl, w8, w4 = rows
    assert w4["size_bytes"] < w8["size_bytes"] < fl["size_bytes"] and w8["value"] >= 0.9
    assert w8["key"]["numerics"] == {"ast": 1, "benchmark": 1, "dynamic": 1}  # not the observers' "quantization"
    assert w8["dynamic"] == {"linears_per_channel": 2, "linears_per_group": 0} and w8["calibration_seconds"] >= 0
    md = (tmp_path / "out" / "accuracy.md").read_text()
    assert "| w8a8 | dynamic | " in md and "| w4a8 | dynamic | " in md and "no W4A4 row" in md
    versions = json.loads((tmp_path / "out" / "accuracy.json").read_text())["versions"]
    assert versions["ast/tts"]["dynamic"] == w8["version"]
    # with the static methods, dynamic comes last in its bits group
    rows = acc.run_accuracy_bench(
        ["ast"], ["max", DYNAMIC_METHOD], ["w8a8"], tmp_path / "out", tmp_path / "cells", settings
    )
    assert [(r["method"], r["bits"]) for r in rows] == [
        ("float", "fp32"),
        ("max", "w8a8"),
        ("dynamic", "w8a8"),
        ("dynamic", "w4a8"),
    ]
