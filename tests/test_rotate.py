"""Hadamard rotation of residual streams (esc_ao.transforms.rotate): the rotation is
orthogonal and keeps the all-ones vector, the rewritten graph computes what the float
model computes on every supported model, streams that cannot be rotated exactly are left
alone with the reason, and a rotated outlier channel no longer owns the per-tensor grid."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from esc_ao import QuantConfig, convert, export_model
from esc_ao.recipe import split_method
from esc_ao.report import output_sqnr
from esc_ao.transforms import ROTATION_KEY, rotate
from esc_ao.transforms.rotate import hadamard, rotation

sys.path.insert(0, str(Path(__file__).parent))
from test_transforms import SHIPPED_MODELS, _relative_error, shipped_model  # noqa: E402

_TOLERANCE = 1e-5


class Block(nn.Module):
    """Pre-LN residual block with the branch kinds the transform folds or rotates online."""

    def __init__(self, d: int, affine: bool) -> None:
        super().__init__()
        self.ln1, self.ln2, self.ln3 = (nn.LayerNorm(d, elementwise_affine=affine) for _ in range(3))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.scaled = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.ln1(x))))  # folded writer
        x = x + 0.5 * self.scaled(self.ln2(x))  # writer through a scalar multiply
        return x + torch.tanh(self.ln3(x))  # not a linear: rotated online


class Stack(nn.Module):
    def __init__(self, d: int = 24, affine: bool = True, tap: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(10, d)
        self.blocks = nn.Sequential(Block(d, affine), Block(d, affine))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 6)
        self.tap = tap

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = self.blocks(torch.relu(self.embed(x)) + 1.0)
        out = self.head(self.ln(h))
        return (out, h) if self.tap else out


def _stack(d: int = 24, affine: bool = True, tap: bool = False, seed: int = 0) -> tuple[nn.Module, list[tuple]]:
    torch.manual_seed(seed)
    model = Stack(d, affine, tap).eval()
    with torch.no_grad():  # one loud channel in the stream, as Whisper's residual stream has
        model.blocks[0].fc2.bias[3] += 30.0
    gen = torch.Generator().manual_seed(seed + 1)
    return model, [(torch.randn(2, 7, 10, generator=gen),) for _ in range(3)]


@pytest.mark.parametrize("n", [2, 12, 20, 24, 40, 64, 144, 384, 512, 768])
def test_hadamard_rows_are_orthogonal(n: int) -> None:
    h = hadamard(n)
    assert h is not None and set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=h.dtype))


@pytest.mark.parametrize("n", [3, 7, 36, 100])
def test_no_hadamard_of_unsupported_orders(n: int) -> None:
    assert hadamard(n) is None


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 130), seed=st.integers(0, 2**16))
def test_rotation_is_orthogonal_and_keeps_the_ones_vector(n: int, seed: int) -> None:
    q = rotation(n, seed)
    eye = torch.eye(n, dtype=q.dtype)
    assert torch.allclose(q @ q.T, eye, atol=1e-12)
    assert torch.allclose(q @ torch.ones(n, dtype=q.dtype), torch.ones(n, dtype=q.dtype), atol=1e-12)
    assert torch.equal(q, rotation(n, seed))  # seeded


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("block", [None, 8])
def test_rotation_keeps_the_float_outputs(affine: bool, block: int | None) -> None:
    model, batches = _stack(affine=affine)
    gm = export_model(model, batches[0])
    records = rotate(gm, mlp_block=block)
    for batch in batches:
        assert _relative_error(model, gm, batch) <= _TOLERANCE
    stream = [r for r in records if "residual stream" in r.detail]
    assert len(stream) == 1 and stream[0].applied
    # online: the entry (relu(embed) + 1), each block's tanh branch and the LayerNorm
    # tanh reads (back to the unrotated basis); every linear around the stream is folded
    assert "5 online" in stream[0].detail
    kinds = [n.meta[ROTATION_KEY] for n in gm.graph.nodes if ROTATION_KEY in n.meta]
    assert sorted(kinds) == ["block"] * (2 if block else 0) + ["dense"] * 5
    assert sum("block Hadamard" in r.detail for r in records) == (2 if block else 0)


def test_rotation_spreads_the_outlier_channel() -> None:
    model, batches = _stack()
    gm = export_model(model, batches[0])
    stream_add = [n for n in gm.graph.nodes if n.target == torch.ops.aten.add.Tensor][1]
    peak_before = _peak_to_rms(gm, stream_add.name, batches)
    rotate(gm)
    assert _peak_to_rms(gm, stream_add.name, batches) < peak_before / 3


def _peak_to_rms(gm: torch.fx.GraphModule, name: str, batches: list[tuple]) -> float:
    seen: list[torch.Tensor] = []

    class Tap(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> object:
            out = super().run_node(n)
            if n.name == name:
                seen.append(out)
            return out

    with torch.no_grad():
        Tap(gm).run(*batches[0])
    x = seen[0]
    return float(x.abs().max() / x.pow(2).mean().sqrt())


def test_a_stream_read_elsewhere_is_left_alone_with_the_reason() -> None:
    model, batches = _stack(tap=True)
    gm = export_model(model, batches[0])
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    records = rotate(gm)
    assert len(records) == 1 and not records[0].applied
    assert "not only by LayerNorms" in records[0].detail and "output" in records[0].detail
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


def test_rotation_keeps_the_model_it_was_exported_from() -> None:
    model, batches = _stack()
    before = copy.deepcopy(model.state_dict())
    rotate(export_model(model, batches[0]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_block_is_refused() -> None:
    model, batches = _stack()
    with pytest.raises(ValueError, match="power of two"):
        rotate(export_model(model, batches[0]), mlp_block=12)
    with pytest.raises(ValueError, match="one rotation flag"):
        split_method("mse+had+had64")


def test_rotation_raises_the_quantized_sqnr_and_keeps_rotations_at_8_bits() -> None:
    model, batches = _stack()

    def sqnr(method: str, label: str) -> tuple[float, object]:
        base, recipe = split_method(method)
        ready = recipe.prepare(export_model(model, batches[0]), batches, QuantConfig.from_label(label, method=base))
        return output_sqnr(model, convert(ready.model), batches[-1:]), ready.quantizer

    plain, _ = sqnr("mse+r16", "w8a8")
    rotated, _ = sqnr("mse+r16+had", "w8a8")
    assert rotated > plain + 3.0
    _, quantizer = sqnr("mse+r16+had8", "w4a4")
    overrides = [cfg for cfg in quantizer.node_name_config.values() if cfg is not None]
    # every online rotation reads 8-bit inputs; the d x d ones keep 8-bit weights, the
    # block ones (exact on any grid) the config's 4
    assert len(overrides) == 7 and all(cfg.act_bits == 8 for cfg in overrides)
    assert sorted(cfg.weight_bits for cfg in overrides) == [4, 4] + [8] * 5


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_rotation_is_exact_on_every_supported_model(name: str) -> None:
    model, batches = shipped_model(name)
    gm = export_model(model, batches[0])
    records = rotate(gm, mlp_block=64)
    for batch in batches[:2]:
        err = _relative_error(model, gm, batch)
        assert err <= _TOLERANCE, f"{name}: relative error {err:.2e}"
    assert all(r.detail for r in records)
    applied = any(r.applied and "residual stream" in r.detail for r in records)
    # the Conformer's streams are cut by each block's final LayerNorm and its convolution
    # module (more online rotations than residual adds: skipped); wav2vec2 is post-LN
    assert applied == (name in ("whisper-tiny.en", "whisper-base", "ast")), records
