"""ESC as a drop-in on the graphs ExecuTorch's own XNNPACKQuantizer prepares, for every
model esc-ao ships: the search completes, never ends worse than it started, and the
converted graph's error is the one the search reports. Those graphs keep what EscQuantizer
removes first (67 ``_assert_tensor_metadata`` nodes in Whisper tiny.en's encoder), which
is what these models exercise and the small test model does not."""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch

from esc_ao import SearchConfig, calibrate, export_model
from esc_ao.report import output_sqnr
from esc_ao.search.space import NoObserversError

# The least the search must do: the local step and one generation, on little data.
_SEARCH = SearchConfig(budget=1, popsize=4, seed=0, progress=False, local_grid=4)


def _whisper(name: str) -> tuple[torch.nn.Module, list[tuple]]:
    from esc_ao.speech import WhisperEncoder, bundled_clips, load_whisper, whisper_mel

    return WhisperEncoder(load_whisper(name)).eval(), [(whisper_mel(bundled_clips("calibration")[0].audio),)]


def _trained(name: str) -> tuple[torch.nn.Module, list[tuple]]:
    from esc_ao.speech import bundled_clips
    from esc_ao.speech.pretrained import load_trained

    tm = load_trained(name)
    # one clip: the Conformer exports for its length (static shapes)
    return tm.model, [(tm.features(bundled_clips("calibration")[0].audio.numpy()),)]


def _wav2vec2() -> tuple[torch.nn.Module, list[tuple]]:
    from test_integration import wav2vec2

    model, batches = wav2vec2()
    return model, batches[:2]


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, list[tuple]]]] = {
    "whisper-tiny.en": lambda: _whisper("tiny.en"),
    "whisper-base": lambda: _whisper("base"),
    "conformer-ctc": lambda: _trained("conformer-ctc"),
    "ast": lambda: _trained("ast"),
    "wav2vec2": _wav2vec2,
}


def _stock(dynamic: bool = False):  # type: ignore[no-untyped-def]
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    return XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_esc_completes_on_the_stock_static_graph(name: str) -> None:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model, batches = MODELS[name]()
    prepared = prepare_pt2e(export_model(model, batches[0]), _stock())
    with torch.no_grad():
        for b in batches:
            prepared(*b)
    result = calibrate(prepared, batches, config=_SEARCH)
    assert len(result.labels) > 10
    assert math.isfinite(result.final_objective) and result.final_objective <= result.initial_objective
    converted = convert_pt2e(prepared)
    # the scales the search kept are the ones convert uses: the converted graph's error
    # is the reported objective (OutputMSE = noise-to-signal of the output)
    want = -10 * math.log10(result.final_objective)
    assert output_sqnr(model, converted, batches) == pytest.approx(want, abs=0.5)


def test_a_dynamic_graph_gets_a_clear_answer() -> None:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    model, batches = _wav2vec2()
    prepared = prepare_pt2e(export_model(model, batches[0]), _stock(dynamic=True))
    prepared(*batches[0])
    with pytest.raises(NoObserversError, match=r"activation observer\(s\) are all dynamic .*no static scale"):
        calibrate(prepared, batches, config=_SEARCH)
