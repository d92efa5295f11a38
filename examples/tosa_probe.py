"""Op by op: where a benchmark model's Ethos-U program parts from its PT2E graph.

    python examples/tosa_probe.py --model conformer-ctc --calib-samples 16 --threads 1
    python examples/tosa_probe.py --model ast --method esc --calib-samples 100 --threads 1

Prepares the model as `esc-ao bench npu` does (Arm's quantizer at batch 1, the Conformer's
utterances silence-padded to one window), observes ``--calib-samples`` calibration
utterances, calibrates as that benchmark's ``--method`` does (arm: Arm's own observers;
mse, esc: esc-ao's search on them, with the same held-out split), converts, and runs esc_ao.lower.tosa_probe on the
first of them: every quantized tensor of the TOSA program against the graph's, each op's
own difference told apart from the accumulated one. Writes
docs/results/tosa_probe_<model>[_<method>].{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from esc_ao.atomic import write_json_atomic, write_text_atomic
from esc_ao.bench.machine import describe
from esc_ao.bench.npu import METHODS, build_model, calibrate_as
from esc_ao.lower.ethosu import prepare_ethosu
from esc_ao.lower.tosa_probe import probe_markdown, probe_on_tosa
from esc_ao.pipeline import convert, observe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="conformer-ctc", choices=["ast", "conformer-ctc"])
    p.add_argument("--target", default="ethos-u85-256")
    p.add_argument("--method", default="arm", choices=METHODS)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    m = build_model(args.model, args.calib_samples, args.seed)
    prepared = prepare_ethosu(m.model, m.calibration[0], args.target)
    observe(prepared, m.calibration)
    calibrate_as(prepared, m, args.method, args.seed)
    report = probe_on_tosa(convert(prepared), m.calibration[0], args.target)
    command = (
        f"python examples/tosa_probe.py --model {args.model} --calib-samples {args.calib_samples} "
        f"--threads {args.threads}"
        + (f" --method {args.method}" if args.method != "arm" else "")
        + (f" --target {args.target}" if args.target != "ethos-u85-256" else "")
    )
    stem = args.out / (f"tosa_probe_{args.model}" + (f"_{args.method}" if args.method != "arm" else ""))
    write_json_atomic(stem.with_suffix(".json"), {"command": command, "machine": describe(), **report.as_dict()})
    own_max = max(o.own_max_lsb for o in report.ops)
    header = [
        f"# {args.model} on {args.target}: the TOSA program against its PT2E graph, tensor by tensor",
        "",
        f"Command: `{command}`; {describe()}. Calibration: {args.method} ({args.calib_samples} calibration "
        "utterances); "
        f"the probe's input is the first of them. {len(report.ops)} quantized tensors compared; the largest "
        f"difference any op makes on its own: {own_max} LSB; {len(report.faulty())} op(s) beyond "
        f"{report.tolerance} LSB on their own. Lowering {report.lower_seconds:.0f} s, one reference-model run "
        f"{report.run_seconds:.1f} s.",
        "",
    ]
    write_text_atomic(stem.with_suffix(".md"), "\n".join(header) + "\n" + probe_markdown(report, 25))
    print(f"{stem}.md: {len(report.ops)} tensors, own max {own_max} LSB, {len(report.faulty())} faulty")


if __name__ == "__main__":
    main()
