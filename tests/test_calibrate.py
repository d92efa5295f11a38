"""esc_ao.search.calibrate: the local step, CMA-ES, determinism, resume, foreign quantizers, errors."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _esc_helpers import run_search, small_setup

from esc_ao import SearchConfig, calibrate, convert, observe
from esc_ao.report import output_sqnr
from esc_ao.search.calibrate import CheckpointError, NonFiniteObjectiveError
from esc_ao.search.checkpoint import load_checkpoint
from esc_ao.search.objectives import OutputMSE
from esc_ao.search.space import NoObserversError, find_scale_dims

FAST = dict(popsize=6, progress=False, local_grid=8)


def test_search_never_ends_worse_than_its_start_and_writes_the_scales() -> None:
    model, prepared, batches = small_setup()
    result = calibrate(prepared, batches, config=SearchConfig(budget=6, **FAST))
    assert result.final_objective <= result.initial_objective
    assert len(result.history) == 6 and result.evaluations == 2 + 6 * 6 + 1
    dims = find_scale_dims(prepared)
    assert [d.observer.scale for d in dims] == pytest.approx(result.final_scales, rel=1e-6)
    # convert_pt2e uses the searched scales.
    converted = convert(prepared)
    q_scales = sorted(
        float(n.args[1])
        for n in converted.graph.nodes
        if str(n.target) == "quantized_decomposed.quantize_per_tensor.default"
    )
    for s in result.final_scales:
        assert min(abs(s - q) for q in q_scales) <= 1e-6 * s


@pytest.mark.slow  # a longer search or a subprocess
def test_esc_improves_on_mse_calibration_at_w4a4() -> None:
    model, mse_prepared, batches = small_setup(method="mse")
    mse_sqnr = output_sqnr(model, convert(mse_prepared), batches)
    _, prepared, _ = small_setup(method="esc")
    # Measured: 20 generations of 8 lower the objective from 0.0555 (MSE start) to 0.0520.
    calibrate(prepared, batches, config=SearchConfig(budget=20, **{**FAST, "popsize": 8}))
    esc_sqnr = output_sqnr(model, convert(prepared), batches)
    assert esc_sqnr > mse_sqnr


def test_same_seed_same_scales_other_seed_other_scales() -> None:
    a, b = run_search(None, 3, seed=5), run_search(None, 3, seed=5)
    assert a == b
    assert run_search(None, 3, seed=6) != a


def test_budget_zero_runs_the_local_step_only() -> None:
    _, prepared, batches = small_setup()
    result = calibrate(prepared, batches, config=SearchConfig(budget=0, **FAST))
    assert result.history == [] and result.final_scales == result.initial_scales
    assert "start:" in result.message


def _generations_in(ckpt: Path) -> int:
    try:
        return len(load_checkpoint(ckpt)["history"])
    except (FileNotFoundError, CheckpointError):
        return 0


@pytest.mark.slow  # a longer search or a subprocess
def test_resume_after_sigkill_gives_the_uninterrupted_scales(tmp_path: Path) -> None:
    helper = Path(__file__).with_name("_esc_helpers.py")
    ckpt, out, reference = tmp_path / "search.ckpt", tmp_path / "scales.pt", tmp_path / "reference.pt"
    budget = "30"
    env = {**os.environ, "PYTHONPATH": str(helper.parent)}
    proc = subprocess.Popen([sys.executable, str(helper), str(ckpt), budget, str(out)], env=env)
    deadline = time.time() + 300
    # The checkpoint is replaced atomically after every generation: kill after the second.
    while _generations_in(ckpt) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _generations_in(ckpt)
    assert not out.exists(), "the search finished before it could be killed: raise the budget"
    assert 2 <= killed_at < 30
    subprocess.run([sys.executable, str(helper), str(ckpt), budget, str(out)], env=env, check=True)
    # The uninterrupted reference runs in a process configured like the killed one (same
    # thread count), since float sums, and so rankings, depend on it.
    subprocess.run([sys.executable, str(helper), "-", budget, str(reference)], env=env, check=True)
    assert torch.load(out) == torch.load(reference)


def test_checkpoint_of_another_config_is_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "search.ckpt"
    run_search(str(ckpt), 1)
    _, prepared, batches = small_setup()
    with pytest.raises(CheckpointError, match="another model"):
        calibrate(prepared, batches, config=SearchConfig(budget=2, seed=9, **FAST), checkpoint=ckpt)


def test_works_on_a_graph_prepared_by_the_stock_xnnpack_quantizer() -> None:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model, _, batches = small_setup()
    from esc_ao import export_model

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(export_model(model, batches[0]), quantizer)
    for b in batches:
        prepared(*b)
    result = calibrate(prepared, batches, config=SearchConfig(budget=3, **FAST))
    assert len(result.labels) > 5 and result.final_objective <= result.initial_objective
    converted = convert_pt2e(prepared)
    assert output_sqnr(model, converted, batches) == pytest.approx(-10 * math.log10(result.final_objective), abs=0.5)


def test_no_observers_in_a_converted_model() -> None:
    _, prepared, batches = small_setup()
    converted = convert(prepared)
    with pytest.raises(NoObserversError, match="prepare_pt2e"):
        calibrate(converted, batches, config=SearchConfig(budget=1, **FAST))


def test_nan_candidates_are_penalised_and_all_nan_stops_with_a_node_name() -> None:
    _, prepared, batches = small_setup()
    calls = {"n": 0}

    def sometimes_nan(outputs, refs) -> float:
        calls["n"] += 1
        return float("nan") if calls["n"] % 3 == 0 and calls["n"] > 2 else OutputMSE()(outputs, refs)

    result = calibrate(prepared, batches, objective=sometimes_nan, config=SearchConfig(budget=2, **FAST))
    assert math.isfinite(result.final_objective)

    def nan_after_start(outputs, refs) -> float:
        calls["n"] += 1
        return float("nan") if calls["n"] > 2 else 1.0

    calls["n"] = 0
    with pytest.raises(NonFiniteObjectiveError, match="first non-finite node"):
        calibrate(prepared, batches, objective=nan_after_start, config=SearchConfig(budget=2, **FAST))


@pytest.mark.slow  # a longer search or a subprocess
def test_a_shared_observer_is_one_dimension() -> None:
    """Observers shared by several tensors (e.g. a residual stream's) are called at several
    nodes; each is one scale, so one search dimension, and the search's written scales are
    exactly the result's (a duplicate dimension would be overwritten by its last copy)."""
    _, prepared, batches = small_setup()
    dims = find_scale_dims(prepared)
    assert len({id(d.observer) for d in dims}) == len(dims)
    assert any(len(d.nodes) > 1 for d in dims)  # the Conformer block shares observers
    calls = sum(1 for n in prepared.graph.nodes if n.op == "call_module" and any(n in d.nodes for d in dims))
    assert calls == sum(len(d.nodes) for d in dims)
    result = calibrate(prepared, batches, config=SearchConfig(budget=20, **FAST))
    assert result.improved and len(result.final_scales) == len(dims)
    assert [d.observer.scale for d in find_scale_dims(prepared)] == pytest.approx(result.final_scales, rel=1e-6)


@pytest.mark.slow  # a longer search or a subprocess
def test_holdout_keeps_a_result_that_also_helps_there() -> None:
    _, prepared, batches = small_setup()
    result = calibrate(prepared, batches[:2], config=SearchConfig(budget=6, **FAST), holdout=batches[2:])
    assert result.improved and result.final_objective < result.initial_objective
    assert result.holdout_final < result.holdout_start and "held-out objective" in result.message
    assert [d.observer.scale for d in find_scale_dims(prepared)] == pytest.approx(result.final_scales, rel=1e-6)


@pytest.mark.slow  # a longer search or a subprocess
def test_holdout_keeps_the_start_when_the_result_is_worse_there() -> None:
    """A held-out objective that prefers larger errors stands in for a search that fitted
    its own batches only: the searched scales are dropped, the start is written."""
    _, prepared, batches = small_setup()
    mse = OutputMSE()
    result = calibrate(
        prepared,
        batches[:2],
        config=SearchConfig(budget=6, **FAST),
        holdout=batches[2:],
        holdout_objective=lambda outputs, refs: -mse(outputs, refs),
    )
    assert not result.improved and result.final_scales == result.initial_scales
    assert result.final_objective == result.initial_objective
    assert result.holdout_final > result.holdout_start and "kept the start" in result.message
    assert [d.observer.scale for d in find_scale_dims(prepared)] == pytest.approx(result.initial_scales, rel=1e-6)


def test_without_holdout_nothing_is_checked() -> None:
    _, prepared, batches = small_setup()
    result = calibrate(prepared, batches, config=SearchConfig(budget=1, **FAST))
    assert result.holdout_start is None and result.holdout_final is None


def test_variable_length_batches_are_searched() -> None:
    """Speech utterances differ in length: objectives compare outputs batch by batch, so
    batches of different shapes (a graph exported with a dynamic dimension) are fine."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from esc_ao import EscQuantizer, QuantConfig

    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()
    steps = torch.export.Dim("steps", min=2, max=16)
    program = torch.export.export(mlp, (torch.randn(2, 3, 4),), dynamic_shapes=({1: steps},))
    p = prepare_pt2e(program.module(), EscQuantizer(QuantConfig(method="esc")))
    odd = [(torch.randn(2, 3, 4),), (torch.randn(2, 5, 4),)]
    observe(p, odd)
    result = calibrate(p, odd, config=SearchConfig(budget=1, **FAST))
    assert math.isfinite(result.final_objective) and result.final_objective <= result.initial_objective


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"popsize": 2}, "minimum of 4"),
        ({"budget": -1}, "budget"),
        ({"sigma0": 0.0}, "sigma0"),
        ({"final": "median"}, "final"),
        ({"log_bounds": (0.5, 1.0)}, "bracket 0"),
    ],
)
def test_bad_search_config(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SearchConfig(**kwargs)


def test_a_search_leaves_the_observers_statistics_as_they_were() -> None:
    """The local step replays candidates through observers (views of a watched tensor):
    they must not record them, or a second search on the same model starts elsewhere."""
    _, prepared, batches = small_setup(bits=8)
    config = SearchConfig(budget=0, progress=False, local_grid=8)
    first = calibrate(prepared, batches, config=config)
    second = calibrate(prepared, batches, config=config)
    assert second.observer_scales == first.observer_scales
    assert second.initial_objective == first.initial_objective and second.final_scales == first.final_scales
