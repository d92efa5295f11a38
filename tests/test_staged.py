"""ESC's staged search: stages that reproduce the full forward exactly, a deterministic
search that never ends worse than its start, subsampled generations and resumable stages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _esc_helpers import small_setup
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx import Interpreter

from esc_ao import SearchConfig, calibrate
from esc_ao.config import SearchConfig as _SearchConfig
from esc_ao.observers import observer_mode
from esc_ao.pipeline import as_batches
from esc_ao.search import staged as staged_module
from esc_ao.search.checkpoint import CheckpointError
from esc_ao.search.distributed import cluster_from_env
from esc_ao.search.es import generation_batches
from esc_ao.search.objectives import CrossEntropy, OutputMSE
from esc_ao.search.space import find_scale_dims
from esc_ao.search.staged import StagedSearch, _noisy_nodes, plan_stages


def _config(**kw) -> SearchConfig:  # type: ignore[no-untyped-def]
    base = dict(budget=0, popsize=6, seed=0, progress=False, local_grid=8, stages=4, stage_budget=2)
    return SearchConfig(**{**base, **kw})


@pytest.mark.parametrize("n_stages", [1, 2, 3, 4, 8])
def test_stages_partition_the_graph_at_single_tensor_cuts(n_stages: int) -> None:
    _, prepared, _ = small_setup()
    dims = find_scale_dims(prepared)
    stages = plan_stages(prepared, dims, n_stages)
    assert 1 <= len(stages) <= n_stages
    assert [n for s in stages for n in s.nodes] == list(prepared.graph.nodes)
    assert sorted(i for s in stages for i in s.dims) == list(range(len(dims)))
    assert [s.boundary is None for s in stages] == [False] * (len(stages) - 1) + [True]
    noisy = _noisy_nodes(prepared, dims)
    for k, s in enumerate(stages[:-1]):
        later = {n for t in stages[k + 1 :] for n in t.nodes}
        crossing = {a for n in later for a in n.all_input_nodes if a in noisy and a not in later}
        assert crossing == {s.boundary}, (k, crossing)
        assert s.dims, f"stage {k} searches nothing"
    if n_stages >= 3:
        assert len(stages) >= 3  # the Conformer block has cuts to spare


def test_every_stage_equals_the_full_forward_bit_for_bit() -> None:
    _, prepared, batches = small_setup()
    batches = as_batches(batches)
    dims = find_scale_dims(prepared)
    stages = plan_stages(prepared, dims, 4)
    with torch.no_grad(), observer_mode(prepared, observing=False, fake_quant=False):
        refs = [prepared(*b) for b in batches]
    search = StagedSearch(prepared, dims, stages, batches, OutputMSE(), refs, cluster_from_env(30))
    with torch.no_grad(), observer_mode(prepared, observing=False, fake_quant=True):
        full = Interpreter(prepared, garbage_collect_values=False)
        out = full.run(*batches[1])
    for k, stage in enumerate(stages):
        value = search.stage_value(k, [dims[i].observer.scale for i in stage.dims], [1])
        if stage.boundary is not None:
            with torch.no_grad(), observer_mode(prepared, observing=False, fake_quant=True):
                env = search.runners[k].run(search.caches[1], batches[1])
            assert torch.equal(env[stage.boundary], full.env[stage.boundary])
            ref = search.float_boundaries[1][stage.boundary]
            assert value == pytest.approx(float((env[stage.boundary] - ref).pow(2).sum() / ref.pow(2).sum()))
        else:
            assert value == pytest.approx(OutputMSE()([out], refs[1:2]), rel=1e-12)
        search.advance(k)


@pytest.mark.slow  # whole searches of a Conformer block
def test_staged_search_is_seeded_and_never_worse_than_its_start() -> None:
    results = []
    for _ in range(2):
        _, prepared, batches = small_setup()
        results.append(calibrate(prepared, batches, config=_config()))
    a, b = results
    assert a.final_scales == b.final_scales and a.final_objective == b.final_objective
    assert a.final_objective <= a.initial_objective
    assert a.evaluations > 2 + 1  # the stages' candidates are counted
    _, prepared, batches = small_setup()
    other = calibrate(prepared, batches, config=_config(seed=1))
    assert other.final_scales != a.final_scales


@pytest.mark.slow  # whole searches of a Conformer block
def test_flat_search_starts_from_the_staged_result() -> None:
    _, prepared, batches = small_setup()
    staged_only = calibrate(prepared, batches, config=_config())
    _, prepared, batches = small_setup()
    both = calibrate(prepared, batches, config=_config(budget=2))
    # CMA-ES with final="mean" ends near its start; the staged point is its start
    assert both.final_objective <= both.initial_objective
    assert both.evaluations > staged_only.evaluations


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 50), seed=st.integers(0, 3), gen=st.integers(1, 5))
def test_generation_batches_are_a_seeded_subset(n: int, k: int, seed: int, gen: int) -> None:
    config = _SearchConfig(subsample=k, seed=seed)
    pick = generation_batches(n, config, (0, gen))
    assert pick == sorted(set(pick)) and all(0 <= i < n for i in pick)
    assert len(pick) == min(k, n)
    assert pick == generation_batches(n, config, (0, gen))
    assert generation_batches(n, _SearchConfig(seed=seed), (0, gen)) == list(range(n))


@pytest.mark.slow  # whole searches of a Conformer block
def test_subsampled_search_differs_by_generation_and_keeps_the_rule() -> None:
    config = _SearchConfig(subsample=3, seed=0)
    picks = {tuple(generation_batches(12, config, (0, g))) for g in range(1, 9)}
    assert len(picks) > 1  # generations score different clips
    _, prepared, batches = small_setup()
    result = calibrate(prepared, batches, config=_config(subsample=1, budget=2))
    assert result.final_objective <= result.initial_objective


def test_subsampling_a_positional_objective_is_refused() -> None:
    _, prepared, batches = small_setup()
    labels = [torch.zeros(2, dtype=torch.long) for _ in batches]
    with pytest.raises(ValueError, match=r"subsample=1 needs a label-free objective .*CrossEntropy"):
        calibrate(prepared, batches, objective=CrossEntropy(labels), config=_config(subsample=1))


@pytest.mark.slow  # whole searches of a Conformer block
def test_a_flat_checkpoint_is_refused_by_a_staged_run_and_back(tmp_path: Path) -> None:
    ckpt = tmp_path / "flat.ckpt"
    _, prepared, batches = small_setup()
    calibrate(prepared, batches, config=_config(stages=1, budget=1), checkpoint=ckpt)
    _, prepared, batches = small_setup()
    with pytest.raises(CheckpointError, match=r"holds a flat search and this run is a staged search \(4 stages\)"):
        calibrate(prepared, batches, config=_config(), checkpoint=ckpt)
    staged = tmp_path / "staged.ckpt"
    _, prepared, batches = small_setup()
    calibrate(prepared, batches, config=_config(), checkpoint=staged)
    _, prepared, batches = small_setup()
    with pytest.raises(CheckpointError, match=r"holds a staged search \(4 stages\) and this run is a flat search"):
        calibrate(prepared, batches, config=_config(stages=1), checkpoint=staged)


@pytest.mark.slow  # whole searches of a Conformer block
def test_an_interrupted_staged_search_resumes_to_the_same_scales(tmp_path: Path, monkeypatch) -> None:
    _, prepared, batches = small_setup()
    whole = calibrate(prepared, batches, config=_config())
    ckpt = tmp_path / "staged.ckpt"
    real = StagedSearch.search_stage
    calls = {"n": 0}

    def dies_in_the_second_stage(self, k, start, config, on_generation=None):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, k, start, config, on_generation)

    monkeypatch.setattr(staged_module.StagedSearch, "search_stage", dies_in_the_second_stage)
    _, prepared, batches = small_setup()
    with pytest.raises(KeyboardInterrupt):
        calibrate(prepared, batches, config=_config(), checkpoint=ckpt)
    monkeypatch.setattr(staged_module.StagedSearch, "search_stage", real)
    _, prepared, batches = small_setup()
    resumed = calibrate(prepared, batches, config=_config(), checkpoint=ckpt)
    assert resumed.final_scales == whole.final_scales


def test_search_bench_variants_parse_into_search_configs() -> None:
    from esc_ao.bench.search_cost import DEFAULT_VARIANTS, parse_variant

    base = _SearchConfig(popsize=8, progress=False)
    name, config = parse_variant("staged:stages=8,stage_budget=4,subsample=2,budget=0", base)
    assert name == "staged" and (config.stages, config.stage_budget, config.subsample, config.budget) == (8, 4, 2, 0)
    assert config.popsize == 8 and parse_variant("flat:sigma0=0.2", base)[1].sigma0 == 0.2
    assert [parse_variant(v, base)[0] for v in DEFAULT_VARIANTS] == ["local", "flat", "staged", "default"]
    with pytest.raises(ValueError, match=r"'stage=8' is not FIELD=VALUE with a SearchConfig field"):
        parse_variant("x:stage=8", base)
    with pytest.raises(ValueError, match=r"stages=0 must be >= 1"):
        parse_variant("x:stages=0", base)
    with pytest.raises(ValueError, match=r"give NAME:FIELD=VALUE"):
        parse_variant(":budget=1", base)
