"""The op-by-op probe of a TOSA program against its PT2E graph: every quantized tensor is
compared, with the op's own difference told apart from what it inherits."""

from __future__ import annotations

import pytest
import torch
from test_ethosu import _data, _prepared

from esc_ao.lower import ethosu
from esc_ao.lower.ethosu import lower_ethosu, tie_duplicate_observers
from esc_ao.lower.executorch import LoweringError
from esc_ao.lower.tosa_probe import _probe_nodes, _with_probe_outputs, probe_markdown, probe_on_tosa
from esc_ao.pipeline import convert
from esc_ao.search.space import find_scale_dims


def _moved_scales() -> tuple[torch.nn.Module, torch.fx.GraphModule, list[tuple[torch.Tensor]]]:
    """A block whose activation scales were moved away from the observers' own (as a
    search moves them): its integer program then differs from the graph by a few LSB."""
    model, prepared, batches = _prepared()
    g = torch.Generator().manual_seed(1)
    for d in find_scale_dims(prepared):
        d.observer.set_scale(d.observer.scale * (0.7 + 0.6 * torch.rand((), generator=g)))
    return model, convert(prepared), batches


def test_probe_outputs_leave_the_graph_s_values_unchanged() -> None:
    _, converted, batches = _moved_scales()
    probed, names, own = _with_probe_outputs(converted)
    assert own == 1
    assert names == [n.name for n in _probe_nodes(converted)] and len(names) > 50
    with torch.no_grad():
        want = converted(*batches[0])
        got = probed(*batches[0])
    assert len(got) == 1 + len(names)
    assert torch.equal(got[0], want)


def test_the_duplicate_means_of_a_decomposed_layer_norm_share_one_observer() -> None:
    _, prepared, _ = _prepared()
    sums = [n for n in prepared.graph.nodes if n.op == "call_function" and "sum" in str(n.target)]
    observed = [next(u for u in n.users if u.op == "call_module").target for n in sums]
    # per LayerNorm: the centring mean's sum and the variance's copy of it share one
    # observer; the sum of squares has its own
    assert len(sums) > len(set(observed)) >= 2
    assert tie_duplicate_observers(prepared) == 0, "a second pass finds nothing left to tie"


@pytest.mark.slow  # lowers to TOSA and runs the reference model
def test_moved_scales_keep_the_program_bit_exact_op_by_op(tmp_path) -> None:
    model, converted, batches = _moved_scales()
    report = probe_on_tosa(converted, batches[0], "ethos-u85-256")
    assert len(report.ops) == len(_probe_nodes(converted)) > 50
    assert report.faulty() == [], probe_markdown(report)
    assert all(o.own_max_lsb == 0 and o.acc_max_lsb == 0 for o in report.ops), probe_markdown(report)
    kinds = {r["op"] for r in report.by_op()}
    assert {"linear", "bmm", "exp", "rsqrt", "gelu", "sum"} <= kinds, kinds
    assert "| linear |" in probe_markdown(report)
    # the last probed tensor is the program's output, as the output check sees it
    result = lower_ethosu(converted, batches[0], tmp_path, "ethos-u85-256", reference=model)
    assert result.check is not None and result.check.max_lsb == report.ops[-1].acc_max_lsb == 0


@pytest.mark.slow
def test_untied_duplicates_are_what_the_probe_finds(monkeypatch) -> None:
    """Without the tie, the backend merges the two means and one is read on the other's
    scale: the probe names the sum, on its own, not an op downstream of it."""
    monkeypatch.setattr(ethosu, "tie_duplicate_observers", lambda prepared: 0)
    _, converted, batches = _moved_scales()
    report = probe_on_tosa(converted, batches[0], "ethos-u85-256")
    bad = report.faulty()
    assert bad and all(o.op == "sum" for o in bad), probe_markdown(report)
    assert max(o.own_max_lsb for o in bad) > 5


@pytest.mark.slow
def test_an_op_off_on_its_own_is_named(monkeypatch) -> None:
    import tosa_reference_model as trm

    _, converted, batches = _moved_scales()
    names = [n.name for n in _probe_nodes(converted)]
    target = names[len(names) // 2]
    run = trm.run

    def faulty(tosa, inputs, **kw):  # type: ignore[no-untyped-def]
        outs, status = run(tosa, inputs, **kw)
        outs[names.index(target)] = outs[names.index(target)] + 7  # one op off by 7 LSB
        return outs, status

    monkeypatch.setattr(trm, "run", faulty)
    report = probe_on_tosa(converted, batches[0], "ethos-u85-256")
    assert report.faulty() and report.faulty()[0].node == target
    assert report.faulty()[0].own_max_lsb >= 7 - 1  # int8 saturation may clip the +7 here and there


def test_a_graph_without_quantized_tensors_is_refused_before_lowering() -> None:
    model, batches = _data(1)
    float_graph = torch.export.export(model, batches[0]).module()
    with pytest.raises(LoweringError, match="no quantized tensor to probe: pass the converted graph"):
        probe_on_tosa(float_graph, batches[0], "ethos-u85-256")
