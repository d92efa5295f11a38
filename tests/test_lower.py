"""Lowering to ExecuTorch XNNPACK: graph rewrites, partitioning, the .pte check and coverage."""

from __future__ import annotations

import math

import pytest
import torch
from _lower_helpers import quantized, tiny_ctc
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from esc_ao import EscQuantizer, QuantConfig, export_model, prepare
from esc_ao.lower import LoweringError, run_pte, tensor_sqnr_db, to_executorch
from esc_ao.lower.passes import decompose_layer_norm
from esc_ao.speech import SplitHeadAttention

# ExecuTorch lowering and the native runner: tens of seconds a test (the slow tier)
pytestmark = pytest.mark.slow

aten = torch.ops.aten


@settings(max_examples=15, deadline=None)
@given(heads=st.sampled_from([1, 2, 4]), head_dim=st.integers(2, 12), t=st.integers(1, 20), b=st.integers(1, 3))
def test_split_head_attention_equals_multihead_attention(heads: int, head_dim: int, t: int, b: int) -> None:
    torch.manual_seed(heads * 1000 + head_dim * 10 + t)
    mha = nn.MultiheadAttention(heads * head_dim, heads).eval()
    x = torch.randn(t, b, heads * head_dim)
    want, _ = mha(x, x, x, need_weights=False)
    got, weights = SplitHeadAttention(mha)(x, x, x)
    assert weights is None
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_split_head_attention_refuses_a_padding_mask() -> None:
    attn = SplitHeadAttention(nn.MultiheadAttention(8, 2))
    x = torch.randn(5, 1, 8)
    with pytest.raises(ValueError, match="lengths=None"):
        attn(x, x, x, key_padding_mask=torch.zeros(1, 5, dtype=torch.bool))


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 6), width=st.integers(2, 40), affine=st.booleans(), eps=st.sampled_from([1e-5, 1e-6]))
def test_decomposed_layer_norm_equals_layer_norm(rows: int, width: int, affine: bool, eps: float) -> None:
    torch.manual_seed(rows * 100 + width)
    norm = nn.LayerNorm(width, eps=eps, elementwise_affine=affine)
    if affine:
        nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
    x = torch.randn(2, rows, width) * 5 + 3
    gm = torch.export.export(norm, (x,)).module()
    assert decompose_layer_norm(gm) == 1
    assert not any(n.target == aten.layer_norm.default for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), norm(x), atol=1e-5, rtol=1e-5)


def test_float_model_lowers_to_one_delegate_with_no_portable_ops(tmp_path) -> None:
    model, inputs = tiny_ctc()
    result = to_executorch(model, inputs, tmp_path / "float.pte")
    cov = result.coverage
    assert cov.delegate_calls == 1 and cov.portable == {}, cov.as_dict()
    assert result.sqnr_db > 80  # float kernels, different summation order only
    assert result.size_bytes == (tmp_path / "float.pte").stat().st_size


@pytest.mark.parametrize("bits", [8, 4])
def test_int8_model_runs_its_gemms_as_integer_kernels_and_matches_the_graph(tmp_path, bits: int) -> None:
    model, inputs = tiny_ctc()
    converted = quantized(model, inputs, bits)
    result = to_executorch(converted, inputs, tmp_path / "q.pte", act_bits=bits)
    cov = result.coverage
    assert cov.delegate_calls == 1 and cov.portable == {}, cov.as_dict()
    # Every linear (2 layers x (2 FFN x 2 + q,k,v,out) + front proj + head) and every
    # convolution (2 front + 3 per layer) is an integer kernel.
    assert cov.integer["linear"] == 2 * 8 + 2, cov.as_dict()
    assert cov.integer["convolution"] == 2 + 2 * 3, cov.as_dict()
    assert "linear" not in cov.float_delegated and "convolution" not in cov.float_delegated
    assert result.sqnr_db >= {8: 10.0, 4: 3.0}[bits]
    # With the float model: the program is as accurate as the graph (within 3 dB).
    checked = to_executorch(converted, inputs, tmp_path / "q2.pte", reference=model)
    assert checked.program_vs_float_db >= checked.graph_vs_float_db - 3.0
    assert result.sqnr_db == pytest.approx(tensor_sqnr_db(converted(*inputs), run_pte(result.path, inputs)[0]))


def test_a_program_that_misses_its_tolerance_is_an_error_and_leaves_no_file(tmp_path) -> None:
    model, inputs = tiny_ctc()
    converted = quantized(model, inputs)
    path = tmp_path / "q.pte"
    with pytest.raises(LoweringError, match="below min_sqnr_db"):
        to_executorch(converted, inputs, path, min_sqnr_db=math.inf)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_bad_arguments_name_the_value(tmp_path) -> None:
    model, inputs = tiny_ctc()
    with pytest.raises(ValueError, match="must end in .pte"):
        to_executorch(model, inputs, tmp_path / "model.bin")
    with pytest.raises(TypeError, match="tuple of tensors"):
        to_executorch(model, inputs[0], tmp_path / "model.pte")
    with pytest.raises(ValueError, match="target='tflite' is not one of reference, xnnpack"):
        EscQuantizer(QuantConfig(), target="tflite")


def test_xnnpack_target_quantizes_gemm_outputs_and_leaves_attention_matmuls_float() -> None:
    model, inputs = tiny_ctc()
    quantizer = EscQuantizer(QuantConfig(method="max"), target="xnnpack")
    prepare(export_model(model, inputs), quantizer)
    records = quantizer.records()
    bmm = [r for r in records if "bmm" in r.op]
    assert bmm and all(not r.quantized and "XNNPACK runs bmm in float" in r.reason for r in bmm)
    linears = [r for r in records if "linear" in r.op]
    # every linear is integer; the CTC head's output leaves the graph, so it stays float
    # (dynamic int8 input) instead of being rounded to int8 on the way out
    assert linears and all(r.quantized for r in linears)
    assert [r.module for r in linears if "dynamic int8 input, float output" in r.reason] == ["head"]
    assert all("input and output" in r.reason for r in linears if r.module != "head")
    reference = EscQuantizer(QuantConfig(method="max"))
    prepare(export_model(model, inputs), reference)
    assert all(r.quantized for r in reference.records() if "bmm" in r.op)


def test_native_runner_gives_the_python_runtimes_output(tmp_path) -> None:
    from esc_ao.lower.runner import run_native

    model, inputs = tiny_ctc()
    result = to_executorch(quantized(model, inputs), inputs, tmp_path / "q.pte")
    want = run_pte(result.path, inputs)[0]
    native = run_native(result.path, inputs, runs=3, warmup=1)
    assert native.output.numel() == want.numel()
    torch.testing.assert_close(native.output, want.flatten(), rtol=0, atol=1e-5)
    assert native.runs == 3 and 0 < native.min_ms <= native.median_ms <= native.max_ms
    # It holds at least the program, and far less than the pytest process that forked it.
    assert result.size_bytes < native.peak_rss_bytes < 200e6


def test_native_runner_rejects_an_input_file_of_the_wrong_size(tmp_path) -> None:
    from esc_ao.lower.runner import run_native

    model, inputs = tiny_ctc()
    result = to_executorch(model, inputs, tmp_path / "f.pte")
    with pytest.raises(RuntimeError, match="input file .* bytes"):
        run_native(result.path, (inputs[0][:, :-1],), runs=1, warmup=0)


def test_fast_partitioner_delegates_what_the_stock_one_does(tmp_path) -> None:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from esc_ao.lower.coverage import op_coverage
    from esc_ao.lower.partition import FastXnnpackPartitioner
    from esc_ao.lower.passes import prepare_for_xnnpack

    model, inputs = tiny_ctc()
    converted = quantized(model, inputs)
    prepare_for_xnnpack(converted)
    exported = torch.export.export(converted, inputs)
    covs = [
        op_coverage(to_edge_transform_and_lower(exported, partitioner=[p]).exported_program())
        for p in (XnnpackPartitioner(), FastXnnpackPartitioner())
    ]
    stock, fast = (c.as_dict() for c in covs)
    assert fast == stock and fast["delegate_calls"] == 1
