"""examples/tensor_groups.py's graph surgery on a small attention model: activations are
grouped by the op that produced them, and leaving a group float (or only it quantized)
changes exactly that group's quantize/dequantize pairs; weights are put back float by
layer."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from test_residual import Attention

from esc_ao import EscQuantizer, QuantConfig, convert, export_model, observe, prepare

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tensor_groups.py"


@pytest.fixture(scope="module")
def groups():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("tensor_groups", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_groups_and_surgery(groups) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = Attention().eval()
    batches = [(torch.randn(1, 40, 16),) for _ in range(3)]
    exported = export_model(model, batches[0])
    before = groups._float_weights(copy.deepcopy(exported))  # prepare renames the nodes
    prepared = prepare(exported, EscQuantizer(QuantConfig(method="max")))
    observe(prepared, batches)
    quantized = convert(prepared)
    floats = groups._matched(list(before.values()), groups._weighted(quantized))
    pairs = groups._pairs(quantized)
    names = {dq.name: groups._group(dq.args[0].args[0]) for dq in pairs}
    assert {"placeholder", "softmax", "linear"} <= set(names.values())
    softmax = {n for n, g in names.items() if g == "softmax"}
    float_softmax = groups._without(quantized, lambda n: n.name not in softmax)
    assert len(groups._pairs(float_softmax)) == len(pairs) - len(softmax)
    assert len(groups._pairs(groups._without(quantized, lambda n: False))) == 0
    refs = [model(*b) for b in batches]
    mels = [b[0] for b in batches]
    wrap = lambda gm: (lambda x: (gm(x),))  # noqa: E731 - the script's models return tuples
    full = groups._sqnr(wrap(quantized), [(r,) for r in refs], mels)
    weights_only = groups._sqnr(wrap(groups._without(quantized, lambda n: False)), [(r,) for r in refs], mels)
    assert weights_only > full
    layers = {groups._layer(n) for n in groups._weighted(quantized)}
    assert layers == {"q", "k", "v", "out"} and set(floats) == {n.name for n in groups._weighted(quantized)}
    # every weight float and every activation float: the float model again
    none = groups._without(quantized, lambda n: False, floats, lambda n: False)
    assert groups._sqnr(wrap(none), [(r,) for r in refs], mels) > 100
    one = groups._without(quantized, lambda n: False, floats, lambda n: groups._layer(n) == "v")
    assert 100 > groups._sqnr(wrap(one), [(r,) for r in refs], mels) > weights_only
