"""Which activations limit a quantized Whisper? The audio part of the accuracy benchmark
(encoder + cross-attention keys/values), quantized with one recipe, calibrated on real
speech; then its quantized activations are grouped by the op that produces them, and the
output SQNR (keys and values against float, held-out real utterances) is measured

- with every group quantized (the recipe as it is),
- with one group left float and the rest quantized ("float <group>": what fixing that
  group alone would give),
- with only that group's activations quantized ("only <group>": the damage it does alone;
  the weights stay quantized throughout).

The weights are grouped the same way by the layer that reads them (block indices
dropped: ``encoder.blocks.*.mlp.2``): "float <layer>" keeps those weights float, "only
<layer>" quantizes only them (activations float in both). Float weights are those after
the recipe's float-exact transforms (smoothing, rotation) and before GPTQ's rounding.

    python examples/tensor_groups.py --model tiny.en --method mse+r16 --bits w8a8

Writes docs/results/tensor_groups_<model>_<method>_<bits>.{json,md}. A diagnosis, not a
benchmark: the SQNR of 1500-frame encoder outputs, not WER.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch.fx import GraphModule, Node

from esc_ao import QuantConfig, convert, export_model
from esc_ao.annotators import OP_ROLES
from esc_ao.atomic import write_json_atomic, write_text_atomic
from esc_ao.bench.tasks import calibration_sample, load_eval_corpus
from esc_ao.config import BIT_LABELS
from esc_ao.graph_prep import drop_noop_casts, resolve_attr
from esc_ao.recipe import split_method

aten = torch.ops.aten
_QD = torch.ops.quantized_decomposed
# ops that move values without changing them: a quantized tensor is named by what produced
# it before them
_MOVES = {
    aten.view.default,
    aten.permute.default,
    aten.transpose.int,
    aten.reshape.default,
    aten.clone.default,
    aten.flatten.using_ints,
    aten.slice.Tensor,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.select.int,
    aten.expand.default,
    aten._unsafe_view.default,
}
_WEIGHTED = {t for t, role in OP_ROLES.items() if role == "weighted"}  # linears and convs


def _group(node: Node) -> str:
    """The op that produced the tensor a quantize node rounds (through moves); a tensor
    produced by a dequantize is a second rounding of an already quantized tensor."""
    while node.op == "call_function" and node.target in _MOVES:
        node = node.args[0]
    if node.op == "call_function" and node.target == _QD.dequantize_per_tensor.default:
        return "requantized view"
    if node.op == "call_function":
        return str(node.target).split(".")[-2]
    return node.op


def _pairs(gm: GraphModule) -> list[Node]:
    """The dequantize nodes of activation quantize/dequantize pairs."""
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and n.target == _QD.dequantize_per_tensor.default
        and isinstance(n.args[0], Node)
        and n.args[0].target == _QD.quantize_per_tensor.default
    ]


def _without(
    gm: GraphModule,
    keep: Callable[[Node], bool],
    float_weights: dict[str, torch.Tensor] | None = None,
    keep_weight: Callable[[Node], bool] = lambda n: True,
) -> GraphModule:
    """A copy of ``gm`` in which every activation pair not kept reads its float input and
    every layer whose weight is not kept reads its float weight (from ``float_weights``,
    by layer node name)."""
    out = copy.deepcopy(gm)
    for dq in _pairs(out):
        if not keep(dq):
            dq.replace_all_uses_with(dq.args[0].args[0])
    for layer in _weighted(out):
        if not keep_weight(layer):
            assert float_weights is not None
            name = f"_float_weight_{layer.name}"
            out.register_buffer(name, float_weights[layer.name])
            with out.graph.inserting_before(layer):
                layer.replace_input_with(layer.args[1], out.graph.get_attr(name))
    out.graph.eliminate_dead_code()
    out.recompile()
    return out


def _weighted(gm: GraphModule) -> list[Node]:
    """The linears and convs whose weight is dequantized from a stored integer weight."""
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and n.target in _WEIGHTED
        and isinstance(n.args[1], Node)
        and n.args[1].op == "call_function"
        and "dequantize" in str(n.args[1].target)
    ]


def _float_weights(prepared: GraphModule) -> dict[str, torch.Tensor]:
    """Each linear/conv node's weight in a graph (prepared or not), by node name (convert
    keeps the names; it replaces the weights by integers)."""
    out = {}
    for node in prepared.graph.nodes:
        if node.op == "call_function" and node.target in _WEIGHTED and isinstance(node.args[1], Node):
            w = node.args[1]
            while w.op == "call_module":  # the weight observer
                w = w.args[0]
            if w.op == "get_attr":
                out[node.name] = resolve_attr(prepared, str(w.target)).detach().clone()
    return out


def _matched(weights: list[torch.Tensor], layers: list[Node]) -> dict[str, torch.Tensor]:
    """The float weights of a graph's linears/convs (in graph order) by the names of the
    converted graph's layers (prepare renames nodes; their order and shapes stay)."""
    if len(weights) != len(layers):
        raise ValueError(f"{len(weights)} float weights for {len(layers)} quantized layers: the graphs differ")
    return {layer.name: w for layer, w in zip(layers, weights)}


def _layer(node: Node) -> str:
    """The module path of a layer, block indices replaced by '*'."""
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else node.name
    return ".".join("*" if part.isdigit() else part for part in path.split("."))


def _sqnr(model: Callable[..., Any], refs: list[Any], mels: list[torch.Tensor]) -> float:
    signal = noise = 0.0
    with torch.no_grad():
        for mel, ref in zip(mels, refs):
            for a, b in zip(ref, model(mel)):
                signal += float(a.double().pow(2).sum())
                noise += float((a.double() - b.double()).pow(2).sum())
    return 10 * math.log10(signal / max(noise, 1e-30))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny.en", "base"), default="tiny.en")
    ap.add_argument("--method", default="mse+r16", help="calibration method with recipe suffix (esc_ao.recipe)")
    ap.add_argument("--bits", default="w8a8", choices=BIT_LABELS)
    ap.add_argument("--calibration", type=int, default=16, help="real-speech calibration utterances")
    ap.add_argument("--held-out", type=int, default=5, help="held-out real-speech test utterances")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from esc_ao.speech import load_whisper, whisper_mel
    from esc_ao.speech.whisper import WhisperAudio

    t0 = time.perf_counter()
    audio = WhisperAudio(load_whisper(args.model).eval()).eval()
    corpus = load_eval_corpus(f"whisper-{args.model}", "real")
    calib = [
        whisper_mel(torch.from_numpy(u.audio()))
        for u in calibration_sample(corpus.utterances("calibration"), args.calibration, 0)
    ]
    test_utts = corpus.utterances("test")
    step = max(1, len(test_utts) // args.held_out)
    test = [whisper_mel(torch.from_numpy(u.audio())) for u in test_utts[::step][: args.held_out]]
    with torch.no_grad():
        refs = [audio(m) for m in test]
    base, recipe = split_method(args.method)
    config = QuantConfig.from_label(args.bits, method=base)
    exported = export_model(audio, (calib[0],))
    # "float" weights: after the recipe's float-exact transforms, before GPTQ rounds them
    # onto their grid (node names are the same in both copies)
    unrounded = copy.deepcopy(exported)
    drop_noop_casts(unrounded)  # openai-whisper casts each weight to the input's dtype
    dataclasses.replace(recipe, gptq=False, act_order=False).transform(unrounded, [(m,) for m in calib], config)
    ready = recipe.prepare(exported, [(m,) for m in calib], config)
    quantized = convert(ready.model)
    floats = _matched(list(_float_weights(unrounded).values()), _weighted(quantized))
    groups: dict[str, list[str]] = defaultdict(list)
    for dq in _pairs(quantized):
        groups[_group(dq.args[0].args[0])].append(dq.name)
    rows = []
    for name, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        names = set(members)
        rows.append(
            {
                "group": name,
                "tensors": len(members),
                "float_group_sqnr_db": round(_sqnr(_without(quantized, lambda n: n.name not in names), refs, test), 2),
                "only_group_sqnr_db": round(_sqnr(_without(quantized, lambda n: n.name in names), refs, test), 2),
            }
        )
    layers: dict[str, set[str]] = defaultdict(set)
    for node in _weighted(quantized):
        layers[_layer(node)].add(node.name)
    weight_rows = []
    for name, members in sorted(layers.items()):
        weight_rows.append(
            {
                "layer": name,
                "layers": len(members),
                "float_layer_sqnr_db": round(
                    _sqnr(_without(quantized, lambda n: False, floats, lambda n: n.name not in members), refs, test), 2
                ),
                "only_layer_sqnr_db": round(
                    _sqnr(_without(quantized, lambda n: False, floats, lambda n: n.name in members), refs, test), 2
                ),
            }
        )
    result = {
        "model": f"whisper-{args.model}",
        "method": args.method,
        "bits": args.bits,
        "calibration_utterances": len(calib),
        "held_out_utterances": len(test),
        "all_quantized_sqnr_db": round(_sqnr(quantized, refs, test), 2),
        "weights_only_sqnr_db": round(_sqnr(_without(quantized, lambda n: False), refs, test), 2),
        "groups": rows,
        "weights": weight_rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    stem = f"tensor_groups_whisper-{args.model}_{args.method}_{args.bits}"
    write_json_atomic(args.out / f"{stem}.json", result)
    cmd = (
        f"python examples/tensor_groups.py --model {args.model} --method {args.method} --bits {args.bits} "
        f"--threads {args.threads}"
    )
    lines = [
        f"# Which activations limit Whisper {args.model}'s audio part: {args.method} {args.bits}",
        "",
        f"Command: `{cmd}`. Output SQNR of the cross-attention keys and values against float on "
        f"{len(test)} held-out real utterances; {len(calib)} real calibration utterances.",
        "",
        f"All quantized: **{result['all_quantized_sqnr_db']} dB**; weights only (every activation float): "
        f"{result['weights_only_sqnr_db']} dB.",
        "",
        "| activations produced by | tensors | this group float, rest quantized (dB) | only this group "
        "quantized (dB) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['group']} | {r['tensors']} | {r['float_group_sqnr_db']} | {r['only_group_sqnr_db']} |" for r in rows
    ]
    lines += [
        "",
        "Weights, activations float: quantized weights give " f"{result['weights_only_sqnr_db']} dB.",
        "",
        "| weights read by | layers | these float, other weights quantized (dB) | only these quantized (dB) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['layer']} | {r['layers']} | {r['float_layer_sqnr_db']} | {r['only_layer_sqnr_db']} |"
        for r in weight_rows
    ]
    write_text_atomic(args.out / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
