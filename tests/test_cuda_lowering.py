"""The CUDA int8-GEMM lowering, checked on CPU (torch._int_mm runs there too)."""

from __future__ import annotations

import pytest
import torch
from _lower_helpers import quantized, tiny_ctc
from hypothesis import given, settings
from hypothesis import strategies as st

from esc_ao.lower.cuda import compile_for_cuda, int8_dynamic_qparams, int8_linear, int8_quantize, lower_int8_linears
from esc_ao.report import tensor_sqnr_db

qd = torch.ops.quantized_decomposed


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(17, 40),
    k=st.sampled_from([8, 16, 48]),
    n=st.sampled_from([8, 24]),
    zp=st.integers(-128, 127),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_int8_linear_equals_the_dequantized_linear(m: int, k: int, n: int, zp: int, bias: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x_q = torch.randint(-128, 128, (2, m, k), dtype=torch.int8, generator=g)
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    x_scale, w_scale = 0.037, torch.rand(n, generator=g) * 0.01 + 1e-4
    b = torch.randn(n, generator=g) if bias else None
    want = torch.nn.functional.linear((x_q.float() - zp) * x_scale, w_q.float() * w_scale[:, None], b)
    got = int8_linear(x_q, x_scale, zp, w_q, w_scale, b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("target", ["reference", "xnnpack"])
def test_lowered_graph_computes_the_converted_graph(target: str) -> None:
    model, inputs = tiny_ctc()
    converted = quantized(model, inputs, target=target)
    with torch.no_grad():
        want = converted(*inputs)
    report = lower_int8_linears(converted)
    # 2 layers x 8 linears + front-end projection + head; no linear left on the float path.
    assert report.replaced == 18 and report.skipped == {}, report
    assert not any(n.target == torch.ops.aten.linear.default for n in converted.graph.nodes)
    with torch.no_grad():
        got = converted(*inputs)
    # Same integer arithmetic; only float rounding before each requantization differs.
    assert tensor_sqnr_db(want, got) > 40


def test_shapes_int_mm_cannot_take_are_left_with_the_reason() -> None:
    model, inputs = tiny_ctc()
    short = (inputs[0][:, :40],)  # 40 frames -> 9 after subsampling: M <= 16
    converted = quantized(model, short)
    report = lower_int8_linears(converted)
    assert report.replaced == 0 and len(report.skipped) == 18
    assert all("M > 16" in why for why in report.skipped.values())


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device on this machine: the compiled "
    "int8 GEMM path needs one (numerics are tested on CPU above)",
)
def test_compiled_cuda_graph_matches_the_reference() -> None:
    model, inputs = tiny_ctc()
    with torch.no_grad():
        float_out = model(*inputs)
    converted = quantized(model, inputs)
    with torch.no_grad():
        want = converted(*inputs)
    # cuDNN convolutions default to TF32; the reference computes them in float32.
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        compiled, _ = compile_for_cuda(converted)
        with torch.no_grad():
            got = compiled(inputs[0].cuda()).cpu()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    # GPU float ops round differently from the CPU's, and a value on a rounding boundary
    # then lands one integer step away, so the two programs are not bit-equal; what must
    # hold is that the GPU program is as close to float as the reference is.
    assert tensor_sqnr_db(want, got) > 25
    assert abs(tensor_sqnr_db(float_out, got) - tensor_sqnr_db(float_out, want)) < 1.0


def test_run_time_qparams_keep_the_output_float32() -> None:
    # choose_qparams.tensor gives a float64 scale and an int64 zero point (the XNNPACK
    # target's dynamically quantized inputs); the GEMM's output must stay float32, or every
    # float op after it fails on mixed dtypes.
    g = torch.Generator().manual_seed(0)
    x_q = torch.randint(-128, 128, (32, 16), dtype=torch.int8, generator=g)
    w_q = torch.randint(-127, 128, (8, 16), dtype=torch.int8, generator=g)
    scale, zp = torch.tensor(0.02, dtype=torch.float64), torch.tensor(3, dtype=torch.int64)
    got = int8_linear(x_q, scale, zp, w_q, torch.full((8,), 0.01), torch.zeros(8))
    assert got.dtype == torch.float32
    want = torch.nn.functional.linear((x_q.float() - 3) * 0.02, w_q.float() * 0.01)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(
    shift=st.floats(-3.0, 3.0),
    spread=st.floats(1e-3, 50.0),
    seed=st.integers(0, 2**16),
)
def test_device_dynamic_quantization_equals_the_decomposed_ops(shift: float, spread: float, seed: int) -> None:
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(seed)) * spread + shift
    scale, zp = qd.choose_qparams.tensor(x, -128, 127, 2**-12, torch.int8)
    got_scale, got_zp = int8_dynamic_qparams(x, -128, 127, 2**-12)
    assert got_scale.dtype == torch.float32 and got_zp.dtype == torch.int32
    assert torch.isclose(got_scale.double(), scale.squeeze(), rtol=1e-6) and int(got_zp) == int(zp)
    want = qd.quantize_per_tensor.tensor(x, scale, zp, -128, 127, torch.int8)
    got = int8_quantize(x, got_scale, got_zp, -128, 127)
    # float32 against the decomposed op's float64 arithmetic: at most a rare flip at a
    # rounding boundary, never more than one step.
    assert (got.int() - want.int()).abs().max() <= 1 and (got != want).float().mean() < 1e-2


def test_lowered_xnnpack_graph_quantizes_on_the_device() -> None:
    # The decomposed run-time ops build eps on the CPU and read qparams back with .item():
    # torch.compile rejects the first next to a CUDA input, the second syncs the host.
    model, inputs = tiny_ctc()
    converted = quantized(model, inputs, target="xnnpack")
    host_ops = {qd.choose_qparams.tensor, qd.quantize_per_tensor.tensor, qd.dequantize_per_tensor.tensor}
    assert [n for n in converted.graph.nodes if n.target in host_ops]  # the target quantizes some inputs at run time
    lower_int8_linears(converted)
    assert not [n.name for n in converted.graph.nodes if n.target in host_ops]
