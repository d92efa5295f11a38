"""The benchmark's speech models on an Arm Ethos-U NPU: Arm's quantizer, three
calibrations of its observers, Vela's figures, and task accuracy of the integer program on
the TOSA reference model.

    esc-ao bench npu [--models ast conformer-ctc] [--methods arm mse esc] [--target ethos-u85-256] [--a16w8]

Per model and calibration: the graph is prepared by ``EthosUQuantizer`` (per-channel int8
weights, int8 activations or int16 ones with ``--a16w8``) at batch 1 and observed on the calibration sample; then

- ``arm``: Arm's own observers as they are (HistogramObserver activations): the stock flow;
- ``mse``: esc-ao's local step on those observers (each scale fitted on its own);
- ``esc``: the local step, then the staged CMA-ES search against the task loss, kept only
  if it beats its start on held-out calibration clips (as in the accuracy benchmark).

The converted graph is lowered for the target (TOSA, Vela), checked on the TOSA reference
model, estimated by Vela on the other sizes of ``SWEEP``, and scored on the test split three
ways: the float model, the converted PT2E graph, and the TOSA program run by the reference
model (bit-exact TOSA semantics: what the NPU computes). An NPU takes one fixed input shape,
so the Conformer reads every utterance silence-padded to one window that holds the longest
(float, graph and program alike); the AST reads one clip at a time.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from esc_ao.atomic import write_json_atomic, write_text_atomic
from esc_ao.bench.machine import describe
from esc_ao.bench.tasks import calibration_sample, holdout_split, load_eval_corpus
from esc_ao.config import SearchConfig
from esc_ao.metrics import Estimate, accuracy, wer
from esc_ao.pipeline import Batch, convert, observe
from esc_ao.search.calibrate import calibrate
from esc_ao.search.objectives import CrossEntropy, CTCLoss, Objective, first_tensor

__all__ = ["METHODS", "MODELS", "SWEEP", "NpuModel", "render", "rerender", "run_npu_bench"]

MODELS = ("ast", "conformer-ctc")
METHODS = ("arm", "mse", "esc")
SWEEP = ("ethos-u55-128", "ethos-u85-256")
SAMPLE_RATE = 16000


@dataclass
class NpuModel:
    """A benchmark model at the NPU's fixed shape: calibration batches with their task
    loss, the test inputs and how their outputs are scored."""

    name: str
    metric: str  # "wer" or "accuracy"
    model: nn.Module
    calibration: list[Batch]
    loss: Callable[[Sequence[int]], Objective]  # task loss of the calibration batches at these indices
    test: list[torch.Tensor]
    score: Callable[[list[torch.Tensor]], Estimate]
    notes: dict[str, Any]


def ast_model(n_calibration: int, seed: int) -> NpuModel:
    from esc_ao.speech.pretrained import load_trained

    tm = load_trained("ast")
    corpus = load_eval_corpus("ast", "tts")
    calib = calibration_sample(corpus.utterances("calibration"), n_calibration, seed)
    labels = [torch.tensor([tm.labels.index(u.label)]) for u in calib]
    test = corpus.utterances("test")
    truth = [tm.labels.index(u.label) for u in test]

    def score(outputs: list[torch.Tensor]) -> Estimate:
        return accuracy([int(o.argmax(-1)) == y for o, y in zip(outputs, truth)])

    return NpuModel(
        "ast",
        "accuracy",
        tm.model,
        [(tm.features(u.audio()),) for u in calib],
        lambda idx: CrossEntropy([labels[i] for i in idx]),
        [tm.features(u.audio()) for u in test],
        score,
        {"test_clips": len(test), "batch": 1},
    )


def _padded(audio: np.ndarray, samples: int) -> np.ndarray:
    return np.pad(audio, (0, samples - len(audio)))


def conformer_model(n_calibration: int, seed: int) -> NpuModel:
    from esc_ao.speech.features import ctc_decode, ctc_encode
    from esc_ao.speech.pretrained import load_trained

    tm = load_trained("conformer-ctc")
    corpus = load_eval_corpus("conformer-ctc", "tts")
    calib = calibration_sample(corpus.utterances("calibration"), n_calibration, seed)
    test = corpus.utterances("test")
    audio = {id(u): u.audio() for u in [*calib, *test]}
    # one window for every utterance: the longest, rounded up to half a second
    window = math.ceil(2 * max(len(a) for a in audio.values()) / SAMPLE_RATE) / 2
    samples = int(window * SAMPLE_RATE)
    targets = [torch.tensor([ctc_encode(u.text)]) for u in calib]
    lengths = [torch.tensor([t.shape[1]]) for t in targets]

    def score(outputs: list[torch.Tensor]) -> Estimate:
        return wer([u.text for u in test[: len(outputs)]], [ctc_decode(o[0]) for o in outputs], seed=seed)

    return NpuModel(
        "conformer-ctc",
        "wer",
        tm.model,
        [(tm.features(_padded(audio[id(u)], samples)),) for u in calib],
        lambda idx: CTCLoss([targets[i] for i in idx], [lengths[i] for i in idx]),
        [tm.features(_padded(audio[id(u)], samples)) for u in test],
        score,
        {"test_utterances": len(test), "window_s": window, "padding": "silence, after the utterance"},
    )


def build_model(name: str, n_calibration: int, seed: int) -> NpuModel:
    if name == "ast":
        return ast_model(n_calibration, seed)
    if name == "conformer-ctc":
        return conformer_model(n_calibration, seed)
    raise ValueError(f"model {name!r} has no NPU benchmark: use one of {', '.join(MODELS)}")


def search_config(method: str, seed: int) -> SearchConfig | None:
    """What each calibration runs after observation (None: Arm's observers as they are)."""
    if method == "arm":
        return None
    if method == "mse":
        return SearchConfig(budget=0, stages=1, seed=seed, progress=False, local_batches=16)
    if method == "esc":
        return SearchConfig(budget=0, stages=8, stage_budget=4, popsize=8, seed=seed, progress=False, local_batches=16)
    raise ValueError(f"method {method!r}: use one of {', '.join(METHODS)}")


def calibrate_as(prepared: torch.fx.GraphModule, m: NpuModel, method: str, seed: int) -> dict[str, Any]:
    """Calibrates an observed graph as ``method`` does (nothing for "arm"; the search on the
    task loss with every fifth calibration batch held out otherwise); returns the search's
    summary (empty for "arm")."""
    config = search_config(method, seed)
    if config is None:
        return {}
    scored, held = holdout_split(len(m.calibration))
    result = calibrate(
        prepared,
        [m.calibration[i] for i in scored],
        objective=m.loss(scored),
        config=config,
        holdout=[m.calibration[i] for i in held],
        holdout_objective=m.loss(held),
    )
    return {
        "scales": len(result.labels),
        "objective_start": result.initial_objective,
        "objective_final": result.final_objective,
        "start": result.start,
        "evaluations": result.evaluations,
        "seconds": round(result.wall_seconds, 1),
    }


def _outputs(forward: Callable[[torch.Tensor], Any], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [first_tensor(forward(x)).detach() for x in inputs]


def _tosa_outputs(tosa: bytes, converted: torch.fx.GraphModule, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The TOSA program's outputs for float inputs, dequantized on the graph's output grid."""
    from esc_ao.lower.ethosu import _edge_qparams, run_tosa_program

    grid, (out_s, out_zp) = _edge_qparams(converted)
    return [
        (torch.from_numpy(run_tosa_program(tosa, x, grid)[0].astype(np.int64)).float() - out_zp) * out_s for x in inputs
    ]


def run_case(
    m: NpuModel, method: str, target: str, work: Path, seed: int, tosa_limit: int | None, a16w8: bool = False
) -> dict[str, Any]:
    """One model and calibration on one accelerator (int8 activations, or int16 with
    ``a16w8``): figures, checks and accuracies."""
    from esc_ao.lower.ethosu import lower_ethosu, prepare_ethosu, vela_sweep

    t0 = time.perf_counter()
    prepared = prepare_ethosu(m.model, m.calibration[0], target, a16w8=a16w8)
    observe(prepared, m.calibration)
    search = calibrate_as(prepared, m, method, seed)
    calib_s = time.perf_counter() - t0
    converted = convert(prepared)
    folder = work / m.name / (f"{method}-a16w8" if a16w8 else method)
    lowered = lower_ethosu(converted, m.calibration[0], folder, target, reference=m.model)
    sweep = [
        row
        for d in lowered.delegates
        for row in vela_sweep(Path(d.tosa), [t for t in SWEEP if t != target], folder / "sweep" / f"delegate{d.index}")
    ]
    n_tosa = len(m.test) if tosa_limit is None else min(tosa_limit, len(m.test))
    t1 = time.perf_counter()
    scores: dict[str, Any] = {
        "float": m.score(_outputs(m.model, m.test)).as_dict(),
        "graph": m.score(_outputs(converted, m.test)).as_dict(),
    }
    if len(lowered.delegates) == 1:
        tosa = Path(lowered.delegates[0].tosa).read_bytes()
        tosa_outs = _tosa_outputs(tosa, converted, m.test[:n_tosa])
        scores["tosa"] = m.score(tosa_outs).as_dict()
        scores["tosa_inputs"] = n_tosa
        if n_tosa < len(m.test):  # float and graph on the same inputs, for a like-for-like row
            scores["float_on_tosa_inputs"] = m.score(_outputs(m.model, m.test[:n_tosa])).as_dict()
            scores["graph_on_tosa_inputs"] = m.score(_outputs(converted, m.test[:n_tosa])).as_dict()
    return {
        "model": m.name,
        "method": method,
        "target": target,
        "activations": "int16" if a16w8 else "int8",
        "metric": m.metric,
        "notes": m.notes,
        "search": search,
        "lowered": {**lowered.as_dict(), "summary": lowered.summary()},
        "sweep": sweep,
        "scores": scores,
        "calibration_seconds": round(calib_s, 1),
        "scoring_seconds": round(time.perf_counter() - t1, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _pct(e: dict[str, Any] | None) -> str:
    if not e:
        return "-"
    return f"{100 * e['value']:.2f} [{100 * e['ci95_low']:.2f}, {100 * e['ci95_high']:.2f}]"


def _label(row: dict[str, Any]) -> str:
    return row["method"] + (" a16w8" if row.get("activations") == "int16" else "")


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Speech models on an Arm Ethos-U NPU (Arm's quantizer)",
        "",
        "Commands: "
        + "; ".join(f"`{c}`" for c in dict.fromkeys(r.get("command", meta["command"]) for r in rows))
        + f". {meta['machine']}, executorch {meta['executorch']}, {meta['n_calibration']} calibration utterances "
        f"(seed {meta['seed']}).",
        "",
        "Calibrations: arm = Arm's own observers (HistogramObserver activations); mse = esc-ao's local step on "
        "them; esc = local step + staged CMA-ES on the task loss, kept only if it beats its start on held-out "
        "calibration clips. Scores in %: float model, converted PT2E graph, and the TOSA program on the TOSA "
        "reference model (what the NPU computes), 95 % intervals.",
        "",
        "| model | calibration | float | PT2E graph | TOSA program | NPU / CPU ops | Vela ms (target) | "
        "SRAM KiB | output within 2 LSB of the graph | TOSA vs float dB (graph) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        low, s = r["lowered"], r["scores"]
        d = low["delegates"]
        chk = low["check"] or {}
        within = f"{100 * (1 - chk['off_fraction']):.2f} % (max {chk['max_lsb']})" if chk else low["check_skipped"]
        db = f"{chk['tosa_vs_float_db']:.2f} ({chk['graph_vs_float_db']:.2f})" if chk else "-"
        tosa = _pct(s.get("tosa"))
        n_test = r["notes"].get("test_utterances", r["notes"].get("test_clips", 0))
        if s.get("tosa_inputs") and s["tosa_inputs"] < n_test:
            tosa += (
                f" on the first {s['tosa_inputs']} (float {_pct(s['float_on_tosa_inputs'])}, "
                f"graph {_pct(s['graph_on_tosa_inputs'])})"
            )
        lines.append(
            f"| {r['model']} | {_label(r)} | {_pct(s['float'])} | {_pct(s['graph'])} | {tosa} | "
            f"{low['delegated_ops']} / {sum(low['cpu_ops'].values())} | "
            f"{sum(x['inference_ms'] for x in d):.2f} ({r['target']}) | "
            f"{max((x['sram_kib'] for x in d), default=0):.1f} | {within} | {db} |"
        )
    lines += ["", "Vela on other sizes (the same TOSA programs):", ""]
    lines += ["| model | calibration | accelerator | ms | SRAM KiB |", "|---|---|---|---|---|"]
    for r in rows:
        for row in r["sweep"]:
            ms = f"{row['inference_ms']:.2f}" if "inference_ms" in row else row.get("error", "-")
            sram = f"{row['sram_kib']:.1f}" if "sram_kib" in row else "-"
            lines.append(f"| {r['model']} | {_label(r)} | {row['target']} | {ms} | {sram} |")
    lines += ["", "Ops left on the CPU (beyond the input's quantize and the output's dequantize):", ""]
    for r in rows:
        rejected = r["lowered"]["rejected"]
        lines.append(
            f"- {r['model']} / {_label(r)}: "
            + (", ".join(f"{x['op']} ({x['reason']})" for x in rejected) if rejected else "none")
        )
    return "\n".join(lines) + "\n"


def rerender(out_dir: Path) -> None:
    """Rewrites ``npu.md`` from ``npu.json``."""
    path = out_dir / "npu.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results to render; run esc-ao bench npu first")
    data = json.loads(path.read_text())
    write_text_atomic(out_dir / "npu.md", render(data["rows"], data["meta"]))


def run_npu_bench(
    models: Sequence[str],
    methods: Sequence[str],
    target: str,
    out_dir: Path,
    work: Path,
    n_calibration: int = 100,
    seed: int = 0,
    tosa_limit: int | None = None,
    command: str = "esc-ao bench npu",
    a16w8: bool = False,
) -> list[dict[str, Any]]:
    """Runs every model x calibration, writes ``npu.json`` / ``npu.md`` into ``out_dir``
    after each (a killed run keeps what finished; rows already there for the same model,
    calibration and target are replaced)."""
    import executorch

    from esc_ao.lower.ethosu import check_accelerator

    check_accelerator(target)
    for method in methods:
        search_config(method, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "npu.json"
    rows: list[dict[str, Any]] = json.loads(path.read_text())["rows"] if path.exists() else []
    meta = {
        "machine": describe(),
        "torch": torch.__version__,
        "executorch": getattr(executorch, "__version__", "1.5.1"),
        "n_calibration": n_calibration,
        "seed": seed,
        "command": command,
    }
    for name in models:
        m = build_model(name, n_calibration, seed)
        for method in methods:
            row = {**run_case(m, method, target, work, seed, tosa_limit, a16w8), "command": command}
            print(json.dumps({k: row[k] for k in ("model", "method", "scores", "seconds")}), flush=True)
            key = (name, method, target, row["activations"])
            rows = [r for r in rows if (r["model"], r["method"], r["target"], r.get("activations", "int8")) != key]
            rows.append(row)
            write_json_atomic(path, {"meta": meta, "rows": rows})
            write_text_atomic(out_dir / "npu.md", render(rows, meta))
    return rows
