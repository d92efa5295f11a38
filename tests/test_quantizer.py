"""EscQuantizer unit tests: graph preparation passes, overrides and the report."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esc_ao import EscQuantizer, QuantConfig, convert, export_model, observe, prepare
from esc_ao.graph_prep import decompose_sdpa, drop_noop_casts
from esc_ao.observers import iter_observers

aten = torch.ops.aten


class Attention(nn.Module):
    def __init__(self, causal: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 48)
        self.out = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.causal = causal

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.proj(x).view(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        return self.norm(x + self.out(a.transpose(1, 2).reshape(x.shape)))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_sdpa_decomposition_keeps_the_numerics(causal: bool, with_mask: bool) -> None:
    torch.manual_seed(0)
    model = Attention(causal and not with_mask).eval()
    x = torch.randn(2, 5, 16)
    args = (x, torch.rand(5, 5) > 0.3) if with_mask else (x,)
    if with_mask:
        args[1][:, 0] = True  # every query sees at least one key
    gm = export_model(model, args)
    assert decompose_sdpa(gm) == 1
    targets = [n.target for n in gm.graph.nodes]
    assert aten.scaled_dot_product_attention.default not in targets
    assert targets.count(aten.matmul.default) == 2 and aten.softmax.int in targets
    torch.testing.assert_close(gm(*args), model(*args), atol=1e-5, rtol=1e-5)


def test_noop_casts_are_dropped_but_real_casts_kept() -> None:
    class M(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.to(torch.float32) + x.to(torch.float64).sum().to(torch.float32)

    gm = export_model(M(), (torch.randn(3),))
    before = sum(n.target == aten.to.dtype for n in gm.graph.nodes)
    assert drop_noop_casts(gm) == 1
    assert sum(n.target == aten.to.dtype for n in gm.graph.nodes) == before - 1
    x = torch.randn(3)
    torch.testing.assert_close(gm(x), M()(x))


def _observer_count(prepared: torch.fx.GraphModule) -> int:
    return sum(1 for _ in iter_observers(prepared))


def _prepared(quantizer: EscQuantizer) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    gm = export_model(Attention().eval(), (torch.randn(2, 5, 16),))
    return prepare(gm, quantizer)


def test_module_name_override_keeps_that_module_float() -> None:
    base = _observer_count(_prepared(EscQuantizer(QuantConfig())))
    quantizer = EscQuantizer(QuantConfig()).set_module_name("out", None)
    assert _observer_count(_prepared(quantizer)) < base
    row = next(r for r in quantizer.records() if r.module == "out")
    assert not row.quantized and "module name 'out'" in row.reason


def test_module_type_override_by_class_and_by_name() -> None:
    for key in (nn.LayerNorm, "torch.nn.modules.normalization.LayerNorm"):
        quantizer = EscQuantizer(QuantConfig()).set_module_type(key, None)
        _prepared(quantizer)
        norm = next(r for r in quantizer.records() if r.op == "aten.layer_norm.default")
        assert not norm.quantized and "module type" in norm.reason


def test_module_override_with_another_config_changes_the_grid() -> None:
    quantizer = EscQuantizer(QuantConfig()).set_module_name("out", QuantConfig(weight_bits=4, act_bits=4))
    prepared = _prepared(quantizer)
    observe(prepared, [(torch.randn(2, 5, 16),)])
    converted = convert(prepared)
    out_linear = next(
        n
        for n in converted.graph.nodes
        if n.target == aten.linear.default and "out" in str(n.meta.get("nn_module_stack", {}))
    )
    act_dq = out_linear.args[0]
    assert tuple(act_dq.args[3:5]) == (-8, 7)
    row = next(r for r in quantizer.records() if r.module == "out")
    assert row.config == "w4a4"


def test_global_none_leaves_everything_float() -> None:
    quantizer = EscQuantizer(QuantConfig()).set_global(None)
    assert _observer_count(_prepared(quantizer)) == 0


def test_report_lists_quantized_and_float_ops_with_reasons() -> None:
    quantizer = EscQuantizer(QuantConfig(method="entropy"))
    assert "prepare_pt2e" in quantizer.report()
    _prepared(quantizer)
    text = quantizer.report()
    assert "compute ops quantized" in text
    assert "entropy calibration" in text and "softmax" in text and "computed in float" in text


def test_one_observer_per_tensor_shared_by_its_consumers() -> None:
    # The LayerNorm output feeds q, k and v through one linear here, but x feeds both the
    # projection and the residual add: one observer must serve both edges.
    prepared = _prepared(EscQuantizer(QuantConfig()))
    x_node = next(n for n in prepared.graph.nodes if n.op == "placeholder")
    observers_of_x = [u for u in x_node.users if u.op == "call_module" and "activation_post_process" in str(u.target)]
    assert len(observers_of_x) == 1


def test_bad_override_names_are_refused() -> None:
    with pytest.raises(ValueError, match="qualified name"):
        EscQuantizer().set_module_name("", None)
    with pytest.raises(TypeError, match="class or its qualified name"):
        EscQuantizer().set_module_type(3, None)  # type: ignore[arg-type]


class _Head(nn.Module):
    """Attention block, then a linear whose output leaves the graph (through a view)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = Attention(), nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)).reshape(x.shape[0], -1)


def test_xnnpack_graph_outputs_stay_float_and_their_linear_runs_dynamic_int8() -> None:
    torch.manual_seed(0)
    model, batch = _Head().eval(), (torch.randn(2, 5, 16),)
    quantizer = EscQuantizer(QuantConfig(), target="xnnpack")
    prepared = prepare(export_model(model, batch), quantizer)
    observe(prepared, [batch])
    converted = convert(prepared)
    head = next(
        n
        for n in converted.graph.nodes
        if n.target == aten.linear.default and "head" in str(n.meta.get("nn_module_stack", {}))
    )
    # the input is quantized with parameters chosen at run time, the output is not quantized
    assert "tensor" in str(head.args[0].target) and "dequantize" in str(head.args[0].target)
    assert all("quantize" not in str(u.target) for u in head.users)
    row = next(r for r in quantizer.records() if r.module == "head")
    assert row.quantized and "dynamic int8 input, float output" in row.reason
    # the reference target quantizes nothing on the way out: no dynamic quantization there
    ref = prepare(export_model(model, batch), EscQuantizer(QuantConfig()))
    assert not any("dynamic" in r.reason for r in EscQuantizer(QuantConfig()).records())
    observe(ref, [batch])
    assert not any("choose_qparams" in str(n.target) for n in convert(ref).graph.nodes)
