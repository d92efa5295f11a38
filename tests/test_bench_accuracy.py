"""The accuracy benchmark's cell cache, outputs and errors, on a small stand-in task (the
real tasks need the trained checkpoints and corpora: the benchmark command runs them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _bench_helpers import stand_in_task as _task

from esc_ao.bench import accuracy as acc
from esc_ao.bench import cells
from esc_ao.bench.accuracy_table import stale_cells


@pytest.fixture
def stand_in(monkeypatch):
    calls = []

    def build(name, n, seed):
        calls.append((name, n, seed))
        return _task(n, seed)

    monkeypatch.setattr(acc, "build_task", lambda name, n, seed, eval_set: build(name, n, seed))
    # The stand-in needs no corpus: the data part of the key is a fixed digest.
    monkeypatch.setattr(acc, "load_eval_corpus", lambda model, eval_set: None)
    monkeypatch.setattr(cells, "data_digest", lambda model, eval_set: f"digest-of-{model}-{eval_set}")
    return calls


def test_cells_are_computed_once_and_outputs_written(stand_in, tmp_path: Path) -> None:
    settings = acc.AccuracySettings(n_calibration=32, budget=2, popsize=4)
    rows = acc.run_accuracy_bench(
        ["ast"], ["max", "esc"], ["w8a8", "w4a4"], tmp_path / "out", tmp_path / "cells", settings
    )
    assert len(stand_in) == 1 and {r["eval_set"] for r in rows} == {"tts"}
    assert [(r["method"], r["bits"]) for r in rows] == [
        ("float", "fp32"),
        ("max", "w8a8"),
        ("esc", "w8a8"),
        ("max", "w4a4"),
        ("esc", "w4a4"),
    ]
    fl = rows[0]
    assert fl["value"] == 1.0 and fl["size_bytes"] == 4 * sum(
        p.numel() for p in _task(32, 0).parts[0].model.parameters()
    )
    for r in rows:
        for key in (
            "model",
            "method",
            "bits",
            "metric",
            "value",
            "size_bytes",
            "ci95_low",
            "ci95_high",
            "calibration_seconds",
            "version",
            "key",
            "eval_set",
            "seed",
            "machine",
        ):
            assert key in r, key
        assert r["ci95_low"] <= r["value"] <= r["ci95_high"]
    w8 = next(r for r in rows if r["bits"] == "w8a8" and r["method"] == "max")
    w4 = next(r for r in rows if r["bits"] == "w4a4" and r["method"] == "max")
    assert w4["size_bytes"] < w8["size_bytes"] < fl["size_bytes"]
    esc = next(r for r in rows if r["method"] == "esc" and r["bits"] == "w4a4")
    assert esc["esc"][0]["objective_final"] <= esc["esc"][0]["objective_start"]
    doc = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert len(doc["rows"]) == 5 and doc["versions"]["ast/tts"] == {
        kind: cells.code_version("ast", kind) for kind in cells.KEY_KINDS
    }
    assert rows[0]["key"]["numerics"] == {"ast": 1, "benchmark": 1, "quantization": 1}
    md = (tmp_path / "out" / "accuracy.md").read_text()
    assert (
        "| w4a4 | esc (2 gen) | " in md
        and "TTS accuracy %" in md
        and (tmp_path / "out" / "accuracy.png").stat().st_size > 1000
    )
    # A second run finds every cell and builds nothing; a new method fills only its cells.
    acc.run_accuracy_bench(["ast"], ["max", "esc"], ["w8a8", "w4a4"], tmp_path / "out", tmp_path / "cells", settings)
    assert len(stand_in) == 1
    rows = acc.run_accuracy_bench(["ast"], ["mse"], ["w8a8"], tmp_path / "out", tmp_path / "cells", settings)
    assert len(stand_in) == 2 and len(rows) == 6
    (tmp_path / "out" / "accuracy.md").unlink()
    assert len(acc.render(tmp_path / "out", tmp_path / "cells", settings)) == 6 and len(stand_in) == 2
    assert "| w8a8 | mse | " in (tmp_path / "out" / "accuracy.md").read_text()
    # A recipe is a row of its own, keyed with the recipes part, and says what it did.
    rows = acc.run_accuracy_bench(["ast"], ["mse+r16+sq"], ["w8a8"], tmp_path / "out", tmp_path / "cells", settings)
    assert len(stand_in) == 3 and len(rows) == 7
    recipe = next(r for r in rows if r["method"] == "mse+r16+sq")
    assert recipe["key"]["numerics"] == {"ast": 1, "benchmark": 1, "quantization": 1, "recipes": 1}
    assert recipe["recipe"]["suffix"] == "+r16+sq" and recipe["recipe"]["transforms"]
    assert all({"part", "node", "applied", "detail"} <= set(t) for t in recipe["recipe"]["transforms"])
    assert "| w8a8 | mse+r16+sq | " in (tmp_path / "out" / "accuracy.md").read_text()
    # A precision plan is computed per part and kept in the cell.
    rows = acc.run_accuracy_bench(["ast"], ["mse+mp50"], ["w4a4"], tmp_path / "out", tmp_path / "cells", settings)
    plan = next(r for r in rows if r["method"] == "mse+mp50")["recipe"]["precision_plans"][0]
    assert plan["budget"] == 0.5 and plan["raised_macs"] <= 0.5 * plan["total_macs"] and plan["candidates"]


def test_cells_are_keyed_by_seed_and_code_version(stand_in, tmp_path: Path, monkeypatch) -> None:
    settings = acc.AccuracySettings(n_calibration=16)
    acc.run_accuracy_bench(["ast"], ["max"], ["w8a8"], tmp_path / "o", tmp_path / "c", settings)
    acc.run_accuracy_bench(
        ["ast"], ["max"], ["w8a8"], tmp_path / "o", tmp_path / "c", acc.AccuracySettings(n_calibration=16, seed=1)
    )
    assert len(stand_in) == 2
    new = cells.CellKey({}, {}, "w", "new data").digest
    monkeypatch.setattr(cells, "cell_key", lambda model, method, eval_set: cells.CellKey({}, {}, "w", "new data"))
    rows = acc.run_accuracy_bench(["ast"], ["max"], ["w8a8"], tmp_path / "o", tmp_path / "c", settings)
    assert len(stand_in) == 3 and {r["version"] for r in rows} == {new}
    # the cells of the older key (both seeds) are stale; the new ones are not
    monkeypatch.setattr(cells, "code_version", lambda model, method, eval_set="tts": new)
    stale = stale_cells(tmp_path / "c")
    assert len(stale) == 4 and all(new not in p.name for p in stale)
    assert len(list((tmp_path / "c" / "ast" / "tts").glob(f"*{new}.json"))) == 2
    acc.render(tmp_path / "o", tmp_path / "c", settings)
    assert "4 cells of older keys are not shown" in (tmp_path / "o" / "accuracy.md").read_text()


def test_unknown_names_list_the_valid_ones(tmp_path: Path) -> None:
    settings = acc.AccuracySettings()
    with pytest.raises(
        ValueError, match="unknown model 'resnet': use one of whisper-tiny.en, whisper-base, conformer-ctc, ast"
    ):
        acc.run_accuracy_bench(["resnet"], ["max"], ["w8a8"], tmp_path, tmp_path, settings)
    with pytest.raises(ValueError, match="unknown method 'gptq': use one of max, percentile, entropy, mse, esc"):
        acc.run_accuracy_bench(["ast"], ["gptq"], ["w8a8"], tmp_path, tmp_path, settings)
    with pytest.raises(ValueError, match=r"unknown recipe flag\(s\) awq"):
        acc.run_accuracy_bench(["ast"], ["mse+awq"], ["w8a8"], tmp_path, tmp_path, settings)
    with pytest.raises(ValueError, match="not on dynamic"):
        acc.run_accuracy_bench(["ast"], ["dynamic+sq"], ["w8a8"], tmp_path, tmp_path, settings)
    with pytest.raises(ValueError, match="unknown bits 'w2a2'"):
        acc.run_accuracy_bench(["ast"], ["max"], ["w2a2"], tmp_path, tmp_path, settings)
    with pytest.raises(ValueError, match="model 'ast' has no evaluation set real: use one of tts"):
        acc.run_accuracy_bench(["ast"], ["max"], ["w8a8"], tmp_path, tmp_path, settings, ["real"])


def test_key_follows_declared_versions_not_source_bytes(stand_in, monkeypatch) -> None:
    from esc_ao.bench import numerics

    v = cells.code_version("ast", "max")
    assert v == cells.code_version("ast", "mse") and len(v) == 12 and int(v, 16) >= 0
    assert cells.code_version("conformer-ctc", "max") != v
    assert cells.code_version("ast", "esc") != v  # ESC cells are keyed by the search's version too
    # no source file is read: a comment-only edit of any module cannot move a key
    real_read = Path.read_bytes

    def no_sources(self: Path) -> bytes:
        assert self.suffix != ".py", f"the cell key read {self}"
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", no_sources)
    assert cells.code_version("ast", "max") == v
    esc = cells.code_version("ast", "esc")
    monkeypatch.setitem(numerics.NUMERICS, "search", 2)  # a declared change of the search: ESC cells only
    assert cells.code_version("ast", "max") == v and cells.code_version("ast", "esc") != esc
    monkeypatch.setitem(numerics.NUMERICS, "whisper", 2)  # another model's task: not this model's cells
    assert cells.code_version("ast", "max") == v
    monkeypatch.setitem(numerics.NUMERICS, "quantization", 2)  # shared numerics: every cell
    assert cells.code_version("ast", "max") != v
    monkeypatch.setitem(numerics.NUMERICS, "quantization", 1)
    monkeypatch.setattr(cells, "_NUMERIC_PACKAGES", ("torch", "numpy"))  # as if a package changed: every cell
    assert cells.code_version("ast", "max") != v
    monkeypatch.undo()
    monkeypatch.setattr(cells, "data_digest", lambda model, eval_set: "another corpus plan")
    assert cells.code_version("ast", "max") != v


def test_cell_keys_are_per_evaluation_set(stand_in) -> None:
    assert cells.code_version("conformer-ctc", "max", "real") != cells.code_version("conformer-ctc", "max", "tts")
    with pytest.raises(ValueError, match="evaluation set 'real' of model 'ast': use one of tts"):
        cells.cell_key("ast", "max", "real")


def test_cli_names_bad_model_and_corpus(capsys, tmp_path: Path) -> None:
    from esc_ao.cli import main

    assert main(["bench", "accuracy", "--models", "resnet", "--cells", str(tmp_path)]) == 2
    assert (
        "unknown model 'resnet': use one of whisper-tiny.en, whisper-base, conformer-ctc, ast"
        in capsys.readouterr().err
    )
    assert main(["corpus", "librispeech"]) == 2
    assert "use one of asr, kws, real-asr" in capsys.readouterr().err


def test_esc_cells_are_keyed_by_their_search_settings(tmp_path: Path) -> None:
    base = cells.AccuracySettings()
    bigger = cells.AccuracySettings(budget=base.budget * 4)
    assert cells.cell_path(tmp_path, "ast", "tts", "esc", "w4a4", base, "v") != cells.cell_path(
        tmp_path, "ast", "tts", "esc", "w4a4", bigger, "v"
    )
    # a baseline does not depend on ESC's search: its cell is shared
    assert cells.cell_path(tmp_path, "ast", "tts", "max", "w4a4", base, "v") == cells.cell_path(
        tmp_path, "ast", "tts", "max", "w4a4", bigger, "v"
    )
    # the staged search gets its own cells; flat cells keep the names they always had
    staged = cells.AccuracySettings(stages=8, stage_budget=4)
    flat = cells.cell_path(tmp_path, "ast", "tts", "esc", "w4a4", base, "v")
    assert flat.name == "esc-w4a4-n100-s0-b30p8g0.1-v.json"
    assert cells.cell_path(tmp_path, "ast", "tts", "esc", "w4a4", staged, "v").name == (
        "esc-w4a4-n100-s0-b30p8g0.1-st8x4-v.json"
    )


def test_the_table_shows_every_esc_search_labelled() -> None:
    from esc_ao.bench.accuracy_table import _search_label

    assert _search_label(None) == ""
    assert _search_label({"budget": 0, "popsize": 8, "sigma0": 0.1}) == " (local step)"
    assert _search_label({"budget": 30, "popsize": 8, "sigma0": 0.1}) == " (30 gen)"
    assert _search_label({"budget": 0, "popsize": 8, "sigma0": 0.1, "stages": 8, "stage_budget": 8}) == (
        " (8 stages x 8 gen)"
    )
    assert _search_label({"budget": 2, "popsize": 8, "sigma0": 0.1, "stages": 4, "stage_budget": 1}) == (
        " (4 stages x 1 gen, 2 gen)"
    )


def test_key_kinds_carry_every_part_a_recipe_uses(stand_in) -> None:
    assert [
        cells.key_kind(m) for m in ("float", "mse", "esc", "dynamic", "mse+r16+sq", "esc+gptq", "mse+xnn+rf", "esc+xnn")
    ] == ["max", "max", "esc", "dynamic", "max+recipe", "esc+recipe", "max+xnn", "esc+xnn"]
    for method in ("mse+xnn+rf+sq", "esc+r16+mp10"):
        assert (
            cells.cell_key("ast", method, "tts").numerics
            == cells.cell_key("ast", cells.key_kind(method), "tts").numerics
        )
    assert "xnnpack" in cells.cell_key("ast", "mse+xnn", "tts").numerics
    assert "xnnpack" not in cells.cell_key("ast", "mse+r16", "tts").numerics
