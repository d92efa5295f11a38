"""Quantization recipes (esc_ao.recipe): method suffixes parse to the recipe they name,
print back to the same suffix, and refuse what cannot be built."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from esc_ao import QuantConfig, export_model
from esc_ao.recipe import Recipe, split_method


@given(
    xnn=st.booleans(),
    residual=st.sampled_from(["", "r16", "rf"]),
    sq=st.booleans(),
    gptq=st.booleans(),
    base=st.sampled_from(["max", "mse", "esc"]),
)
def test_suffix_round_trips(xnn: bool, residual: str, sq: bool, gptq: bool, base: str) -> None:
    if xnn and residual == "r16":
        return  # refused: see below
    flags = (
        (["xnn"] if xnn else [])
        + ([residual] if residual else [])
        + (["sq"] if sq else [])
        + (["gptq"] if gptq else [])
    )
    method = base + "".join(f"+{f}" for f in flags)
    got_base, recipe = split_method(method)
    assert got_base == base and base + recipe.suffix == method
    assert recipe.target == ("xnnpack" if xnn else "reference") and (recipe.smooth, recipe.gptq) == (sq, gptq)
    assert recipe.residual == {"": "int8", "r16": "int16", "rf": "float"}[residual]
    quantizer = recipe.quantizer(QuantConfig())
    assert (quantizer.target, quantizer.residual) == (recipe.target, recipe.residual)


def test_plain_method_is_the_plain_recipe() -> None:
    assert split_method("mse") == ("mse", Recipe())
    assert Recipe().suffix == "" and "plain" in Recipe().describe()


@pytest.mark.parametrize(
    "method, message",
    [
        ("mse+awq", r"unknown recipe flag\(s\) awq"),
        ("mse+sq+sq", "each flag at most once"),
        ("mse+r16+rf", "one residual flag"),
        ("mse+xnn+r16", "XNNPACK has no 16-bit kernels"),
    ],
)
def test_bad_suffixes_are_refused_with_the_fix(method: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_method(method)


def test_transform_runs_only_the_recipes_transforms() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4)).eval()
    batches = [(torch.randn(2, 3, 8),)]
    assert Recipe().transform(export_model(model, batches[0]), batches, QuantConfig()) == []
    records = Recipe(smooth=True).transform(export_model(model, batches[0]), batches, QuantConfig())
    assert len(records) == 1 and records[0].transform == "smooth"


def test_mixed_precision_flag_carries_its_budget() -> None:
    base, recipe = split_method("mse+r16+sq+mp2.5")
    assert base == "mse" and recipe.precision_budget == 0.025 and recipe.suffix == "+r16+sq+mp2.5"
    assert "within 2.5 % of MACs" in recipe.describe()
    for bad in ("mse+mp0", "mse+mpx", "mse+mp5+mp10", "mse+mp150"):
        with pytest.raises(ValueError, match=r"\+mpN"):
            split_method(bad)


class _Tied(nn.Module):
    """Token embedding tied to the output projection, as in Whisper's decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.mid = nn.Linear(8, 8)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(self.mid(self.embed(tokens)), self.embed.weight)


def test_tied_output_projection_keeps_8_bit_weights_under_4_bits() -> None:
    from esc_ao.recipe import tied_linears

    torch.manual_seed(0)
    model, batch = _Tied().eval(), (torch.randint(0, 20, (2, 5)),)
    w4 = QuantConfig(weight_bits=4, act_bits=8, method="max")
    _, recipe = split_method("max+t8")
    gm = export_model(model, batch)
    assert len(tied_linears(gm)) == 1
    ready = recipe.prepare(gm, [batch], w4)
    configs = {r.module: r.config for r in ready.quantizer.records() if "linear" in r.op}
    assert sorted(configs.values()) == ["w4a8", "w8a8"]  # the tied projection at 8 bits, "mid" at 4
    assert configs["mid"] == "w4a8"
    plain = Recipe().prepare(export_model(model, batch), [batch], w4)
    assert {r.config for r in plain.quantizer.records() if "linear" in r.op} == {"w4a8"}


def test_sizes_count_each_weight_at_its_own_width() -> None:
    from esc_ao.report import weight_bytes

    torch.manual_seed(0)
    model, batch = _Tied().eval(), (torch.randint(0, 20, (2, 5)),)
    w4 = QuantConfig(weight_bits=4, act_bits=8, method="max")
    plain = Recipe().prepare(export_model(model, batch), [batch], w4).model
    tied = split_method("max+t8")[1].prepare(export_model(model, batch), [batch], w4).model
    # the 20 x 8 tied projection at 8 bits instead of 4: 80 bytes more, scales unchanged
    assert weight_bytes(tied)["quantized_bytes"] - weight_bytes(plain)["quantized_bytes"] == 80


class _ConvFront(torch.nn.Module):
    """A conv front end before a linear, as Whisper's encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(4, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.nn.functional.gelu(self.conv(x)).transpose(1, 2))


@pytest.mark.parametrize("label, conv", [("w4a8", "w8a8"), ("w4a4", "w8a4"), ("w8a8", "w8a8")])
def test_convolutions_keep_8_bit_weights_under_4_bits(label: str, conv: str) -> None:
    torch.manual_seed(0)
    model, batch = _ConvFront().eval(), (torch.randn(2, 4, 10),)
    ready = split_method("max+c8")[1].prepare(export_model(model, batch), [batch], QuantConfig.from_label(label))
    configs = {r.op: r.config for r in ready.quantizer.records() if r.quantized}
    assert configs["aten.conv1d.default"] == conv and configs["aten.linear.default"] == label
