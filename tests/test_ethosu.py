"""The Arm Ethos-U target: Arm's quantizer, ESC on its observers, lowering with Vela's
figures per delegate, and the TOSA reference model's check of the integer program."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization.pt2e import DerivedObserverOrFakeQuantize
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

from esc_ao import SearchConfig, calibrate
from esc_ao.cli import main
from esc_ao.lower.ethosu import (
    MAX_LSB,
    TosaCheck,
    _refusal,
    accelerators,
    check_accelerator,
    lower_ethosu,
    prepare_ethosu,
    vela_sweep,
)
from esc_ao.lower.executorch import LoweringError
from esc_ao.pipeline import convert
from esc_ao.search.space import SearchableObserver, find_scale_dims


class Block(nn.Module):
    """A small pre-LayerNorm transformer block (attention written out, GELU MLP)."""

    def __init__(self, d: int = 32, heads: int = 2, gate: bool = False) -> None:
        super().__init__()
        self.heads, self.gate = heads, gate
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(self.ln1(x)).chunk(3, -1)
        )
        a = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        x = x + self.out((a @ v).transpose(1, 2).reshape(b, t, d))
        if self.gate:  # a comparison: boolean tensors, which the U55 cannot hold
            x = torch.where(x > 0, x, 0.1 * x)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def _data(n: int = 4) -> tuple[torch.nn.Module, list[tuple[torch.Tensor]]]:
    torch.manual_seed(0)
    return Block().eval(), [(torch.randn(1, 16, 32),) for _ in range(n)]


def _prepared(target: str = "ethos-u85-256", model: torch.nn.Module | None = None):  # type: ignore[no-untyped-def]
    block, batches = _data()
    model = model or block
    prepared = prepare_ethosu(model, batches[0], target)
    for b in batches:
        prepared(*b)
    return model, prepared, batches


def test_accelerator_names_are_vela_s_own() -> None:
    names = accelerators()
    assert {"ethos-u55-128", "ethos-u65-256", "ethos-u85-256"} <= set(names)
    assert check_accelerator("ethos-u85-512") == "ethos-u85-512"
    # a valid family with a size Vela lacks passes ExecuTorch's compile spec and would only
    # fail inside Vela's argument parser: refused here, with the list
    for bad in ("ethos-u99-1", "ethos-u55-99"):
        with pytest.raises(ValueError, match=rf"target='{bad}' is not an Ethos-U accelerator .*ethos-u55-128"):
            check_accelerator(bad)


def test_missing_tools_name_the_packages(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tosa_reference_model", None)
    with pytest.raises(ImportError, match=r"needs tosa-tools: pip install --no-deps tosa-tools==.*ethos-u-vela=="):
        accelerators()


def test_esc_searches_arm_observers_and_keeps_them_shared() -> None:
    _, prepared, batches = _prepared()
    observers = {
        id(prepared.get_submodule(n.target))
        for n in prepared.graph.nodes
        if n.op == "call_module" and "activation_post_process" in str(n.target)
    }
    dims = find_scale_dims(prepared)
    # one dimension per shared observer object, every call of it through one wrapper
    wrapped = {str(n.target): prepared.get_submodule(n.target) for d in dims for n in d.nodes if n.op == "call_module"}
    assert all(isinstance(w, SearchableObserver) for w in wrapped.values())
    assert len(dims) == len({id(d.observer) for d in dims}) and len(dims) < len(observers)
    # a derived bias scale follows the searched input scale (Arm quantizes biases to int32
    # at input scale x weight scale)
    derived = [m for m in prepared.modules() if isinstance(m, DerivedObserverOrFakeQuantize)]
    assert derived and all(
        any(isinstance(src, SearchableObserver) for src in m.obs_or_fqs) for m in derived
    ), "a bias observer still derives from an unwrapped observer"
    result = calibrate(prepared, batches, config=SearchConfig(budget=1, popsize=4, progress=False, local_grid=4))
    assert result.final_objective <= result.initial_objective


def test_a_searched_input_scale_reaches_the_bias() -> None:
    _, prepared, _ = _prepared()
    dims = find_scale_dims(prepared)
    derived = next(m for m in prepared.modules() if isinstance(m, DerivedObserverOrFakeQuantize))
    act = next(src for src in derived.obs_or_fqs if isinstance(src, SearchableObserver) and not src.per_channel)
    weight = next(src for src in derived.obs_or_fqs if src is not act)
    act.set_scale(act.scale * 1.25)
    bias_scale = derived.calculate_qparams()[0]
    assert torch.allclose(bias_scale, act.scale * weight.calculate_qparams()[0].float(), rtol=1e-6)
    assert any(d.observer is act for d in dims)
    convert_pt2e(prepared)  # converts with the wrapped observers


@pytest.mark.slow  # lowering with Vela and the TOSA reference model
def test_a_block_lowers_whole_to_the_npu_and_matches_on_the_tosa_model(tmp_path: Path) -> None:
    model, prepared, batches = _prepared()
    calibrate(prepared, batches, config=SearchConfig(budget=0, stages=4, stage_budget=1, popsize=4, progress=False))
    result = lower_ethosu(convert(prepared), batches[0], tmp_path, "ethos-u85-256", reference=model)
    assert (tmp_path / "model.pte").stat().st_size == result.size_bytes > 0
    assert len(result.delegates) == 1 and result.rejected == []
    d = result.delegates[0]
    assert d.npu_ops > 20 and d.cpu_ops == 0 and d.cycles_total > 0 and d.inference_ms > 0 and d.sram_kib > 0
    assert Path(d.tosa).stat().st_size > 0
    # only the input's quantize and the output's dequantize stay outside the delegate
    assert set(result.cpu_ops) <= {
        "quantized_decomposed_quantize_per_tensor_default",
        "quantized_decomposed_dequantize_per_tensor_default",
        "getitem",
    }, result.cpu_ops
    check = result.check
    assert check is not None and check.off_fraction == 0.0 and check.max_lsb <= MAX_LSB
    assert sum(check.lsb_histogram.values()) == 16 * 32
    # the integer program is as close to float as the graph it came from
    assert check.tosa_vs_float_db is not None and check.graph_vs_float_db is not None
    assert abs(check.tosa_vs_float_db - check.graph_vs_float_db) < 1.0 and check.graph_vs_float_db > 20.0
    rows = vela_sweep(Path(d.tosa), ["ethos-u85-128", "ethos-u85-512"], tmp_path / "sweep")
    small, large = rows
    assert small["cycles_total"] > large["cycles_total"] > 0, rows


@pytest.mark.slow
def test_an_op_the_u55_cannot_run_is_reported_not_dropped(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, prepared, batches = _prepared("ethos-u55-128", Block(gate=True).eval())
    result = lower_ethosu(convert(prepared), batches[0], tmp_path, "ethos-u55-128", reference=model)
    assert len(result.delegates) == 2
    reasons = {r["op"]: r["reason"] for r in result.rejected}
    assert any("gt" in op for op in reasons) and any("bool" in why for why in reasons.values()), reasons
    assert result.check is None and "2 delegates" in result.check_skipped
    assert "2 NPU delegate(s)" in result.summary()


@pytest.mark.slow
def test_the_main_job_writes_an_ethos_u_program_and_its_report(tmp_path: Path) -> None:
    model, batches = _data(6)
    torch.export.save(torch.export.export(model, batches[0]), str(tmp_path / "block.pt2"))
    torch.save(batches, tmp_path / "calib.pt")
    out = tmp_path / "out"
    args = ["quantize", "--program", str(tmp_path / "block.pt2"), "--calib-data", str(tmp_path / "calib.pt")]
    assert main([*args, "--target", "ethos-u85-256", "--stage-budget", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    npu = report["ethosu"]
    assert report["target"] == "ethos-u85-256" and npu["delegates"][0]["npu_ops"] > 20
    assert (out / "ethosu" / "model.pte").stat().st_size == npu["size_bytes"]
    assert Path(npu["delegates"][0]["tosa"]).is_file(), "paths in the report name the final files"
    assert {r["target"] for r in npu["sweep"]} >= {"ethos-u55-128", "ethos-u85-512"}
    md = (out / "report.md").read_text()
    assert "## Ethos-U delegates" in md and "TOSA reference model vs the converted graph" in md


def test_bad_npu_requests_are_usage_errors(tmp_path: Path, capsys) -> None:
    assert main(["quantize", "--target", "ethos-u99-1", "--out", str(tmp_path)]) == 2
    assert "ethos-u85-256" in capsys.readouterr().err
    assert main(["quantize", "--a16w8", "--out", str(tmp_path)]) == 2
    assert "--a16w8 is for Ethos-U targets" in capsys.readouterr().err
    assert main(["quantize", "--target", "npu", "--out", str(tmp_path)]) == 2
    assert "use reference, xnnpack or an Ethos-U accelerator" in capsys.readouterr().err


def _check(off: float, tosa_db: float | None, graph_db: float | None) -> TosaCheck:
    return TosaCheck({"0": 10, "1": 5, "2": 1, ">2": 2}, 5, off, 30.0, tosa_db, graph_db, 1.0)


def test_a_program_is_refused_for_lost_accuracy_not_for_rounding_that_accumulates() -> None:
    # as close to float as the graph: written, however many LSB the rounding accumulated
    assert _refusal(_check(0.2, 14.9, 15.0), 3.0) == ""
    lost = _refusal(_check(0.0, 10.0, 15.0), 3.0)
    assert "10.00 dB from float where the converted graph is 15.00 dB" in lost
    # without the float model, the LSB rule decides
    assert _refusal(_check(1e-4, None, None), 3.0) == ""
    assert "more than 2 LSB on 1.00 %" in _refusal(_check(0.01, None, None), 3.0)


@pytest.mark.slow
def test_a_program_that_lost_accuracy_is_refused_and_not_left_behind(tmp_path: Path, monkeypatch) -> None:
    import esc_ao.lower.ethosu as ethosu

    model, prepared, batches = _prepared()
    monkeypatch.setattr(ethosu, "check_on_tosa", lambda *a: _check(0.0, 5.0, 30.0))
    with pytest.raises(LoweringError, match="5.00 dB from float where the converted graph is 30.00 dB"):
        lower_ethosu(convert(prepared), batches[0], tmp_path, "ethos-u85-256", reference=model)
    assert not (tmp_path / "model.pte").exists()
