"""Per-operator profiles of .pte programs (esc_ao.bench.op_profile) and the native runner's
thread count: what the speed table's time shares and thread rows rest on."""

from __future__ import annotations

import pytest
import torch
from _lower_helpers import quantized, tiny_ctc
from torch import nn

from esc_ao.bench.op_profile import CATEGORIES, category, op_kind, profile_pte
from esc_ao.lower import to_executorch


@pytest.mark.parametrize(
    ("name", "kind", "cat"),
    [
        ("Fully Connected (NC, QS8, QC8W) GEMM #12", "Fully Connected (NC, QS8, QC8W) GEMM", "int8 gemm"),
        ("Fully Connected (NC, QDU8, F32, QB4W) GEMM #1", "Fully Connected (NC, QDU8, F32, QB4W) GEMM", "int8 gemm"),
        ("Fully Connected (NC, F32) GEMM #3", "Fully Connected (NC, F32) GEMM", "float gemm"),
        ("Batch Matrix Multiply (NC, F32) #2", "Batch Matrix Multiply (NC, F32)", "float gemm"),
        ("Convolution (NHWC, QS8, QC8W) IGEMM #1", "Convolution (NHWC, QS8, QC8W) IGEMM", "int8 gemm"),
        ("Convolution (NHWC, QC8) IGEMM #2", "Convolution (NHWC, QC8) IGEMM", "int8 gemm"),
        ("Convolution (NHWC, F32) IGEMM #2", "Convolution (NHWC, F32) IGEMM", "float gemm"),
        ("Convert (NC, F32, QS8) #40", "Convert (NC, F32, QS8)", "convert"),
        ("Softmax (NC, F32) #1", "Softmax (NC, F32)", "other xnnpack"),
    ],
)
def test_operator_names_map_to_kinds_and_categories(name: str, kind: str, cat: str) -> None:
    assert op_kind(name) == kind
    assert category(kind) == cat


@pytest.mark.slow
def test_profile_of_a_float_and_an_int8_program(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 64)).eval()
    inputs = (torch.randn(1, 200, 64),)
    pte = to_executorch(model, inputs, tmp_path / "f.pte").path
    profile = profile_pte(pte, inputs, runs=3)
    assert set(profile.categories) == set(CATEGORIES)
    assert profile.calls["Fully Connected (NC, F32) GEMM"] == 2
    assert sum(profile.kinds.values()) <= profile.total_ms
    assert profile.categories["float gemm"] > profile.categories["other xnnpack"]
    assert abs(sum(profile.shares().values()) - 100.0) < 1e-6
    ctc, ctc_inputs = tiny_ctc()
    q = to_executorch(quantized(ctc, ctc_inputs), ctc_inputs, tmp_path / "q.pte").path
    int8 = profile_pte(q, ctc_inputs, runs=2)
    assert any(category(k) == "int8 gemm" for k in int8.kinds) and int8.categories["int8 gemm"] > 0
    with pytest.raises(ValueError, match="runs=0"):
        profile_pte(q, ctc_inputs, runs=0)


@pytest.mark.slow
def test_native_runner_runs_on_the_thread_count_it_is_given(tmp_path) -> None:
    from esc_ao.lower.runner import run_native

    model, inputs = tiny_ctc()
    pte = to_executorch(model, inputs, tmp_path / "f.pte").path
    one, two = (run_native(pte, inputs, runs=2, warmup=0, threads=n) for n in (1, 2))
    assert (one.threads, two.threads) == (1, 2)
    torch.testing.assert_close(one.output, two.output, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="threads=0"):
        run_native(pte, inputs, threads=0)
