"""Group-wise linear weights (QuantConfig.weight_group, recipe +gN): the observer, its
conversion, GPTQ onto group grids, the quantizer's choices and what it refuses."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from esc_ao import EscQuantizer, QuantConfig, convert, export_model, observe, prepare
from esc_ao.eval_graph import for_evaluation
from esc_ao.observers import GroupWeightObserver, PerChannelWeightObserver, iter_observers, observer_mode, qrange
from esc_ao.recipe import Recipe, split_method
from esc_ao.report import output_sqnr, weight_bytes

_GROUP_DQ = torch.ops.quantized_decomposed.dequantize_per_channel_group.default


def _setup(outlier: float = 0.0) -> tuple[nn.Module, list[tuple]]:
    """Two linears (64 -> 96 -> 40, 40 not a multiple of 32) and a conv that must keep
    per-channel weights; ``outlier`` scales one input column of the first weight, the
    case group-wise scales are for."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(64, 64, 3, padding=1)
            self.fc1, self.fc2, self.fc3 = nn.Linear(64, 96), nn.Linear(96, 40), nn.Linear(40, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x.transpose(1, 2)).transpose(1, 2)
            return self.fc3(torch.relu(self.fc2(torch.nn.functional.gelu(self.fc1(x)))))

    model = Net().eval()
    with torch.no_grad():
        model.fc1.weight[:, 5] *= 1 + outlier
    return model, [(torch.randn(2, 20, 64),) for _ in range(4)]


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([4, 8]),
    group=st.sampled_from([8, 16]),
    w=arrays(
        np.float32, st.tuples(st.integers(1, 6), st.sampled_from([16, 32, 48])), elements=st.floats(-1e3, 1e3, width=32)
    ).map(torch.from_numpy),
)
def test_each_group_maps_its_largest_weight_onto_the_grid(bits: int, group: int, w: torch.Tensor) -> None:
    qmin, qmax = qrange(bits, weight=True)
    obs = GroupWeightObserver(group_size=group, quant_min=qmin, quant_max=qmax, ch_axis=0)
    obs(w)
    scale, zp = obs.calculate_qparams()
    assert scale.shape == (w.shape[0], w.shape[1] // group) and bool((scale > 0).all()) and bool((zp == 0).all())
    obs.observing, obs.fake_quant = False, True
    err = (obs(w) - w).abs().reshape(w.shape[0], -1, group)
    assert bool((err <= scale[..., None] / 2 + 1e-6 * w.abs().reshape(err.shape) + 1e-30).all())  # nothing clipped
    # never coarser than one scale per channel: each group's step is at most the channel's
    per_channel = PerChannelWeightObserver(quant_min=qmin, quant_max=qmax, ch_axis=0)
    per_channel(w)
    assert bool((scale <= per_channel.calculate_qparams()[0][:, None] * (1 + 1e-6)).all())


def test_only_linears_whose_width_the_group_divides_are_grouped_and_convert_matches_simulation() -> None:
    model, batches = _setup()
    quantizer = EscQuantizer(QuantConfig(weight_bits=4, act_bits=8, method="mse", weight_group=32))
    prepared = prepare(export_model(model, batches[0]), quantizer)
    observe(prepared, batches)
    grouped = [o for _, o in iter_observers(prepared) if isinstance(o, GroupWeightObserver)]
    assert sorted(tuple(o.absmax.shape) for o in grouped) == [(40, 3), (96, 2)]  # fc2, fc1; not fc3 (40 in)
    details = {r.node: r.reason for r in quantizer.records()}
    assert "group-32 weight" in details["linear"] and "group-32 weight" in details["linear_1"]
    assert "per-channel weight" in details["linear_2"] and "per-channel weight" in details["conv1d"]
    with observer_mode(prepared, observing=False, fake_quant=True), torch.no_grad():
        simulated = [prepared(*b) for b in batches]
    converted = convert(copy.deepcopy(prepared))
    assert sum(n.target == _GROUP_DQ for n in converted.graph.nodes) == 2
    assert not any(
        isinstance(p, torch.nn.Parameter)
        and p.dtype.is_floating_point
        and p.dim() == 2
        and p.shape in ((96, 64), (40, 96))
        for p in converted.parameters()
    )  # int levels, not float
    fast = for_evaluation(copy.deepcopy(converted))
    assert not any(n.target == _GROUP_DQ for n in fast.graph.nodes)  # folded to constants
    with torch.no_grad():
        for b, want in zip(batches, simulated):
            torch.testing.assert_close(converted(*b), want, rtol=0, atol=0)
            torch.testing.assert_close(fast(*b), want, rtol=0, atol=0)


def test_groups_rescue_a_weight_outlier_and_cost_their_scales() -> None:
    model, batches = _setup(outlier=30.0)

    def run(group: int | None) -> tuple[float, dict[str, int]]:
        prepared = prepare(
            export_model(model, batches[0]),
            EscQuantizer(QuantConfig(weight_bits=4, act_bits=8, method="mse", weight_group=group)),
        )
        observe(prepared, batches)
        return output_sqnr(model, convert(copy.deepcopy(prepared)), batches), weight_bytes(prepared)

    (per_channel, bytes_pc), (grouped, bytes_g) = run(None), run(16)
    assert grouped > per_channel + 3.0
    # fc1: 96 x (64/16) scales instead of 96; fc2: 40 x 6 instead of 40 (4 bytes each)
    assert bytes_g["quantized_bytes"] - bytes_pc["quantized_bytes"] == 4 * (96 * 3 + 40 * 5)
    assert bytes_g["float32_bytes"] == bytes_pc["float32_bytes"]


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_with_groups_lands_on_the_group_grid_and_beats_rounding(bits: int) -> None:
    from esc_ao.transforms import gptq

    model, batches = _setup(outlier=30.0)
    gm = export_model(model, batches[0])
    records = gptq(gm, batches, bits, group_size=32)
    applied = {r.node: r.detail for r in records if r.applied}
    assert "group-32" in applied["linear"] and "group-32" in applied["linear_1"]
    assert applied["linear_2"].startswith(f"{bits}-bit weights")  # 40 inputs: per-channel
    ratios = [float(d.split(" x")[1].split(" ")[0]) for d in applied.values()]
    assert all(r <= 1.0 for r in ratios)
    rounded = {n: p.detach().clone() for n, p in gm.named_parameters() if n.endswith("weight") and p.dim() == 2}
    prepared = prepare(gm, EscQuantizer(QuantConfig(weight_bits=bits, act_bits=8, method="max", weight_group=32)))
    observe(prepared, batches)
    converted = convert(prepared)
    with torch.no_grad():
        for node in converted.graph.nodes:
            if node.target == _GROUP_DQ:
                got = node.target(
                    *[converted.get_buffer(a.target) if isinstance(a, torch.fx.Node) else a for a in node.args]
                )
                want = next(w for w in rounded.values() if w.shape == got.shape)
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # convert's integers are GPTQ's


def test_recipe_flag_and_refusals() -> None:
    base, recipe = split_method("mse+r16+gptq+t8+g64+mp10")
    assert base == "mse" and recipe.weight_group == 64 and recipe.suffix == "+r16+gptq+t8+g64+mp10"
    assert "group-64 weights" in recipe.describe()
    assert recipe.configure(QuantConfig(weight_bits=4)).weight_group == 64
    with pytest.raises(ValueError, match="weight_group=3 must be None"):
        split_method("mse+g3")
    with pytest.raises(ValueError, match="one weight-group flag"):
        split_method("mse+g32+g64")
    with pytest.raises(ValueError, match="XNNPACK runs group-wise weights only with dynamic"):
        split_method("mse+xnn+g32")
    with pytest.raises(ValueError, match="XNNPACK runs group-wise weights only with dynamic"):
        Recipe(target="xnnpack", weight_group=32)
    model, batches = _setup()
    with pytest.raises(ValueError, match="weight_group=32 on target='xnnpack'"):
        prepare(export_model(model, batches[0]), EscQuantizer(QuantConfig(weight_group=32), target="xnnpack"))
    for bad in (0, 12, True, 16.0):
        with pytest.raises(ValueError, match="power of two >= 8"):
            QuantConfig(weight_group=bad)


def test_lowering_and_the_cli_refuse_group_weights_before_any_work(tmp_path, capsys) -> None:
    from esc_ao.cli import main
    from esc_ao.lower.executorch import LoweringError, to_executorch

    model, batches = _setup()
    prepared = prepare(
        export_model(model, batches[0]),
        EscQuantizer(QuantConfig(weight_bits=4, act_bits=8, method="mse", weight_group=32)),
    )
    observe(prepared, batches)
    with pytest.raises(LoweringError, match="2 group-wise weight.*per-channel weights .*for a .pte"):
        to_executorch(convert(prepared), batches[0], tmp_path / "m.pte")
    assert not (tmp_path / "m.pte").exists()
    out = tmp_path / "job"
    assert main(["quantize", "--weight-group", "32", "--out", str(out)]) == 2
    assert "XNNPACK runs group-wise weights only with dynamic" in capsys.readouterr().err
    assert main(["quantize", "--target", "reference", "--weight-group", "32", "--out", str(out)]) == 2
    assert "add --no-pte" in capsys.readouterr().err
    assert not out.exists()
