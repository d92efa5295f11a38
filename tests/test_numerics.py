"""The declared numerics versions (esc_ao.bench.numerics) hold: every part's reference
figures, computed here, equal the ones recorded for its current version. A change that
moves numbers without a version bump fails here instead of silently reusing benchmark
cells computed by other numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from esc_ao.bench.numerics import NUMERICS, PARTS, model_parts, reference_figures

REFERENCE = json.loads((Path(__file__).parent / "data" / "numerics_reference.json").read_text())


def _differences(recorded: Any, got: Any, path: str = "") -> list[str]:
    """Where ``got`` differs from ``recorded``: floats within 1e-3 relative (the figures are
    rounded, and float noise between CPUs stays far below that), everything else exactly."""
    if isinstance(recorded, dict) and isinstance(got, dict):
        keys = sorted(set(recorded) | set(got))
        return [d for k in keys for d in _differences(recorded.get(k), got.get(k), f"{path}/{k}")]
    if isinstance(recorded, float) or isinstance(got, float):
        ok = (
            isinstance(recorded, (int, float))
            and isinstance(got, (int, float))
            and (math.isclose(recorded, got, rel_tol=1e-3, abs_tol=1e-4) or (math.isinf(recorded) and recorded == got))
        )
        return [] if ok else [f"{path}: recorded {recorded}, now {got}"]
    return [] if recorded == got else [f"{path}: recorded {recorded}, now {got}"]


@pytest.mark.parametrize(
    "part", [p for p in PARTS if p != "whisper"] + [pytest.param("whisper", marks=pytest.mark.slow)]
)
def test_reference_figures_match_the_declared_version(part: str) -> None:
    assert part in REFERENCE, f"no reference figures for {part!r}: run scripts/record_numerics.py"
    recorded = REFERENCE[part]
    assert recorded["version"] == NUMERICS[part], (
        f"NUMERICS[{part!r}] is {NUMERICS[part]} but the figures were recorded at version {recorded['version']}: "
        f"run `.venv/bin/python scripts/record_numerics.py --parts {part}`"
    )
    torch.set_num_threads(1)
    diffs = _differences(recorded["figures"], reference_figures(part))
    assert not diffs, (
        f"{part}'s numbers moved while NUMERICS[{part!r}] stayed {NUMERICS[part]}: if the change is "
        f"meant, bump it in esc_ao/bench/numerics.py (recomputes the cells it decides) and run "
        f"scripts/record_numerics.py --parts {part}; else find what moved: {diffs[:6]}"
    )


def test_differences_catch_a_moved_figure() -> None:
    assert _differences({"a": 1.0, "b": [1, 2]}, {"a": 1.0000001, "b": [1, 2]}) == []
    assert _differences({"a": 1.0}, {"a": 1.01}) == ["/a: recorded 1.0, now 1.01"]
    assert _differences({"b": [1, 2]}, {"b": [2, 1]}) and _differences({"a": 1}, {"a": 1, "c": 2})


def test_model_parts_key_only_what_decides_a_cell() -> None:
    assert model_parts("ast", "max") == {"ast": 1, "benchmark": 1, "quantization": 1}
    assert set(model_parts("whisper-base", "esc")) == {"whisper", "benchmark", "quantization", "search"}
    assert set(model_parts("whisper-base", "mse+r16+sq")) == {"whisper", "benchmark", "quantization", "recipes"}
    assert set(model_parts("ast", "esc+xnn+rf")) == {"ast", "benchmark", "quantization", "recipes", "search", "xnnpack"}
    with pytest.raises(ValueError, match="use one of"):
        model_parts("resnet", "max")
    with pytest.raises(ValueError, match="unknown: use one of quantization"):
        reference_figures("nope")
