"""The CUDA int8-GEMM lowering, checked on CPU (torch._int_mm runs there too)."""

from __future__ import annotations

import pytest
import torch
from _lower_helpers import quantized, tiny_ctc
from hypothesis import given, settings
from hypothesis import strategies as st

from esc_ao.lower.cuda import compile_for_cuda, int8_linear, lower_int8_linears
from esc_ao.lower.executorch import tensor_sqnr_db


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
    converted = quantized(model, inputs)
    with torch.no_grad():
        want = converted(*inputs)
    compiled, _ = compile_for_cuda(converted)
    with torch.no_grad():
        got = compiled(inputs[0].cuda()).cpu()
    assert tensor_sqnr_db(want, got) > 40
