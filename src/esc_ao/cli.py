"""``esc-ao`` command line: thin layers over the public API."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, NoReturn, Sequence

import torch

from esc_ao.annotators import ATTENTION_MATMULS, RESIDUAL_PRECISIONS, TARGETS
from esc_ao.bench.dynamic import BENCH_METHODS, DYNAMIC_METHOD
from esc_ao.bench.search_cost import DEFAULT_VARIANTS
from esc_ao.config import BIT_LABELS, METHODS, QuantConfig, SearchConfig
from esc_ao.job import JobInputs, NpuTarget, quantize_job, whisper_default
from esc_ao.pipeline import check_batches, input_shapes
from esc_ao.recipe import main_job_recipe
from esc_ao.search.checkpoint import load_checkpoint
from esc_ao.search.objectives import objective_by_name

__all__ = ["main"]

DEFAULT_OUT = Path("esc_ao_out")
# The main job's default search: the staged search, sized to finish the whole job within
# 5 minutes on 2 cores (docs/esc.md): 8 stages x 4 generations x 8 candidates on 3
# of the 12 bundled clips per generation, no flat search after it.
DEFAULT_BUDGET = 0
DEFAULT_POPSIZE = 8
DEFAULT_STAGES = 8
DEFAULT_STAGE_BUDGET = 4
DEFAULT_SUBSAMPLE = 3


class UsageError(ValueError):
    """A command-line value that cannot work: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (the value and where to look), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="esc-ao", description="Low-bit integer quantization of speech models.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    q = sub.add_parser(
        "quantize",
        help="quantize a model and write the program and a report",
        description="With no arguments: Whisper tiny.en's encoder, calibrated on the bundled clips.",
    )
    q.add_argument("--program", type=Path, help="a saved torch.export program (.pt2) instead of the default model")
    q.add_argument(
        "--calib-data", type=Path, help="with --program: torch.save'd list of input tuples (or tensors) to calibrate on"
    )
    q.add_argument("--method", default="esc", choices=METHODS)
    q.add_argument("--weight-bits", type=int, default=8, choices=(4, 8))
    q.add_argument("--act-bits", type=int, default=8, choices=(4, 8))
    q.add_argument("--affine", action="store_true", help="affine activation grids (default symmetric)")
    q.add_argument("--calib-clips", type=int, default=None, help="use only the first N bundled calibration clips")
    q.add_argument(
        "--keep-float",
        action="append",
        default=[],
        metavar="MODULE",
        help="qualified module name to leave in float (repeatable), e.g. encoder.blocks.3",
    )
    q.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    q.add_argument(
        "--target",
        default="xnnpack",
        metavar="TARGET",
        help="xnnpack (default): the ops XNNPACK runs as int8 kernels, int8 in and out; "
        "reference: the paper's full integer model (attention matmuls too); an Arm Ethos-U NPU by "
        "Vela's name (ethos-u55-128, ethos-u85-256, ...): Arm's quantizer, TOSA, Vela's estimate",
    )
    q.add_argument(
        "--a16w8",
        action="store_true",
        help="Ethos-U targets: int16 activations with int8 weights (default int8 activations)",
    )
    q.add_argument("--no-pte", action="store_true", help="skip the ExecuTorch .pte (write model.pt2 only)")
    r = q.add_argument_group("recipe (esc_ao.recipe)")
    r.add_argument(
        "--residual",
        default=None,
        choices=RESIDUAL_PRECISIONS,
        help="the residual stream's precision: int16 (reference target), float, or int8; default: "
        "int16 on the reference target, float on xnnpack",
    )
    r.add_argument(
        "--attention-probs",
        default="int8",
        choices=("int8", "int16"),
        help="the attention probabilities' grid (softmax outputs an attention matmul reads): int16 on the reference "
        "target only (xnnpack runs attention in float); default int8",
    )
    r.add_argument(
        "--attention",
        default=None,
        choices=ATTENTION_MATMULS,
        help="xnnpack target: which attention matmuls run as XNNPACK's int8 batch matmul: float (none), scores "
        "(queries x keys), int8 (both; the probabilities' int8 grid costs accuracy); default: the recipe's",
    )
    r.add_argument(
        "--rotate",
        action="store_true",
        help="Hadamard-rotate each pre-LayerNorm residual stream, folded into the weights (default: off)",
    )
    r.add_argument(
        "--rotate-block",
        type=int,
        default=None,
        metavar="N",
        help="with --rotate, also rotate the input of each linear reading an activation function online, "
        "in blocks of N channels (a power of two, e.g. 64)",
    )
    r.add_argument(
        "--no-smooth",
        action="store_true",
        help="skip LayerNorm -> linear smoothing (default: smoothed, alpha per site)",
    )
    r.add_argument(
        "--gptq",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="GPTQ rounding of the linears' weights (default: on at 4-bit weights, off at 8)",
    )
    r.add_argument(
        "--conv-8bit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="under 4-bit weights, convolutions keep 8-bit weights (Whisper's conv front end; "
        "default: on at 4-bit weights)",
    )
    r.add_argument(
        "--weight-group",
        type=int,
        default=None,
        metavar="N",
        help="group-wise linear weights: one scale per N input channels of each output channel "
        "(a power of two, e.g. 32; reference target only; default: per-channel)",
    )
    r.add_argument(
        "--precision-budget",
        type=float,
        default=None,
        metavar="FRACTION",
        help="mixed precision: raise the most sensitive layer groups (to float at W8A8, to W8A8 under "
        "4 bits) within this fraction of the multiply-accumulates, e.g. 0.05 (default: none)",
    )
    e = q.add_argument_group("ESC search (--method esc)")
    e.add_argument(
        "--budget",
        type=int,
        default=DEFAULT_BUDGET,
        help=f"CMA-ES generations (default {DEFAULT_BUDGET}; the paper uses 100; 0: local step only)",
    )
    e.add_argument(
        "--popsize", type=int, default=DEFAULT_POPSIZE, help=f"candidates per generation (default {DEFAULT_POPSIZE})"
    )
    e.add_argument(
        "--stages",
        type=int,
        default=DEFAULT_STAGES,
        help="search the graph in up to N stages first, each with what comes before it cached, then "
        f"the flat search from there (default {DEFAULT_STAGES}; 1: the flat search only, as the paper)",
    )
    e.add_argument(
        "--stage-budget",
        type=int,
        default=DEFAULT_STAGE_BUDGET,
        help=f"CMA-ES generations per stage (default {DEFAULT_STAGE_BUDGET})",
    )
    e.add_argument(
        "--subsample",
        type=int,
        default=DEFAULT_SUBSAMPLE,
        help="calibration clips each generation scores, the same for all its candidates "
        f"(default {DEFAULT_SUBSAMPLE}; 0: all)",
    )
    e.add_argument("--sigma0", type=float, default=0.1)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument(
        "--objective",
        default="mse",
        choices=("mse", "kl"),
        help="mse: output noise-to-signal vs float; kl: softmax KL of logits",
    )
    e.add_argument("--checkpoint", type=Path, help="search state file, written each generation; resumed if present")
    b = sub.add_parser("bench", help="benchmarks that write docs/results/")
    bsub = b.add_subparsers(dest="bench", required=True)
    bb = bsub.add_parser("baselines", help="Whisper tiny.en encoder output SQNR for every method and bit width")
    bb.add_argument("--calib-clips", type=int, default=None)
    bb.add_argument("--out", type=Path, default=Path("docs/results"))
    be = bsub.add_parser("esc", help="ESC vs MSE on Whisper tiny.en's encoder; search speed (evaluations/s)")
    be.add_argument("--bits", nargs="+", default=["w4a4", "w8a8"], choices=BIT_LABELS)
    be.add_argument("--budget", type=int, default=20)
    be.add_argument("--popsize", type=int, default=8)
    be.add_argument("--seed", type=int, default=0)
    be.add_argument("--calib-clips", type=int, default=None)
    be.add_argument("--out", type=Path, default=Path("docs/results"))
    bc = bsub.add_parser(
        "calib",
        help="one ESC calibration of Whisper tiny.en's encoder: evaluations/s, wall time "
        "(run under torchrun --nproc-per-node N to shard it)",
    )
    bc.add_argument("--bits", default="w8a8", choices=BIT_LABELS)
    bc.add_argument("--budget", type=int, default=3)
    bc.add_argument("--popsize", type=int, default=8)
    bc.add_argument("--calib-clips", type=int, default=None)
    bq = bsub.add_parser(
        "search",
        help="ESC search variants (flat, staged, subsampled) on the main job's model: wall time, "
        "objective, real-speech SQNR and WER",
    )
    bq.add_argument(
        "--variants",
        nargs="+",
        default=list(DEFAULT_VARIANTS),
        help="NAME:FIELD=VALUE,... with SearchConfig fields (default: %(default)s)",
    )
    bq.add_argument("--test-utterances", type=int, default=100, help="real-speech test utterances scored")
    bq.add_argument("--popsize", type=int, default=8)
    bq.add_argument("--seed", type=int, default=0)
    bq.add_argument("--out", type=Path, default=Path("docs/results"))
    bs = bsub.add_parser(
        "speed",
        help="float vs int8 vs 4-bit ExecuTorch XNNPACK programs: latency (native " "runner), size, peak memory",
    )
    bs.add_argument(
        "--models", nargs="+", default=["conformer", "whisper-encoder", "whisper-base-encoder", "ast", "linear-stack"]
    )
    bs.add_argument(
        "--variants",
        nargs="+",
        default=["float", "int8", "int8-default", "int8-qk8", "int8-att8", "w4a4", "w4-dyn", "8da8w", "8da4w"],
        help="programs to time (esc_ao.bench.speed names each)",
    )
    bs.add_argument("--runs", type=int, default=20)
    bs.add_argument("--rounds", type=int, default=3)
    bs.add_argument("--out", type=Path, default=Path("docs/results"))
    bs.add_argument("--work", type=Path, default=Path("esc_ao_out/speed"), help="where the .pte files go")
    bs.add_argument("--reuse", action="store_true", help="reuse .pte files (and their .json) already in --work")
    bs.add_argument("--lower-only", action="store_true", help="write the .pte files, time nothing")
    bs.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="thread counts to time each program at")
    bs.add_argument(
        "--profile-runs", type=int, default=5, help="runs of the per-operator profile (1 thread); 0: no profile"
    )
    ba = bsub.add_parser(
        "accuracy",
        help="WER / accuracy of every calibration method and bit width on the trained "
        "speech models (cached per cell)",
    )
    ba.add_argument("--models", nargs="+", default=["conformer-ctc", "ast", "whisper-tiny.en", "whisper-base"])
    ba.add_argument(
        "--eval-sets",
        nargs="+",
        default=None,
        help="real (human recordings) and/or tts (the TTS corpora); default: each model's own",
    )
    ba.add_argument(
        "--methods",
        nargs="+",
        default=list(BENCH_METHODS),
        help=f"calibration methods, and {DYNAMIC_METHOD} (dynamic int8 activations, no calibration; "
        "W8A8 and W4A8 only)",
    )
    ba.add_argument("--bits", nargs="+", default=list(BIT_LABELS))
    ba.add_argument("--calib-samples", type=int, default=100, help="calibration utterances (paper: 100)")
    ba.add_argument("--seed", type=int, default=0)
    ba.add_argument("--budget", type=int, default=30, help="ESC's CMA-ES generations")
    ba.add_argument("--popsize", type=int, default=8)
    ba.add_argument("--stages", type=int, default=1, help="ESC's staged search first (default 1: flat only)")
    ba.add_argument("--stage-budget", type=int, default=8, help="CMA-ES generations per stage")
    ba.add_argument("--out", type=Path, default=Path("docs/results"))
    ba.add_argument(
        "--cells",
        type=Path,
        default=Path("docs/results/accuracy_cells"),
        help="one JSON per computed cell; existing cells are reused",
    )
    ba.add_argument(
        "--render-only", action="store_true", help="rewrite the table from the cells present; compute nothing"
    )
    ba.add_argument(
        "--prune", action="store_true", help="delete the cells of older keys (the table never shows them), then render"
    )
    bn = bsub.add_parser(
        "npu",
        help="the speech models on an Arm Ethos-U NPU: Arm's quantizer with Arm / MSE / ESC calibration, "
        "Vela's figures, accuracy of the TOSA program on the TOSA reference model",
    )
    bn.add_argument("--models", nargs="+", default=["ast", "conformer-ctc"], choices=["ast", "conformer-ctc"])
    bn.add_argument("--methods", nargs="+", default=["arm", "mse", "esc"], choices=["arm", "mse", "esc"])
    bn.add_argument("--target", default="ethos-u85-256", help="the Vela accelerator lowered for")
    bn.add_argument("--a16w8", action="store_true", help="int16 activations (Arm's a16w8 configuration)")
    bn.add_argument("--calib-samples", type=int, default=100)
    bn.add_argument("--seed", type=int, default=0)
    bn.add_argument(
        "--tosa-limit", type=int, default=None, help="score the TOSA program on the first N test inputs (default: all)"
    )
    bn.add_argument("--out", type=Path, default=Path("docs/results"))
    bn.add_argument("--work", type=Path, default=Path("esc_ao_out/npu"), help="where the programs go")
    bn.add_argument("--render-only", action="store_true", help="rewrite npu.md from npu.json; compute nothing")
    c = sub.add_parser(
        "corpus", help="build (or verify) the offline corpora: TTS (asr, kws) and real speech (real-asr)"
    )
    c.add_argument("names", nargs="*", default=["asr", "kws", "real-asr"])
    for parser, command in (
        (q, _quantize),
        (bb, _baselines),
        (be, _esc_bench),
        (bc, _calib_bench),
        (bq, _search_bench),
        (bs, _speed_bench),
        (ba, _accuracy_bench),
        (bn, _npu_bench),
        (c, _corpus),
    ):
        parser.set_defaults(func=command)
    return p


def _load_calib(path: Path) -> list:
    """The --calib-data file: a torch.save'd list of input tuples (data only)."""
    if not path.is_file():
        raise UsageError(f"--calib-data {path}: no such file")
    try:
        data = torch.load(path, weights_only=True)
    except Exception as exc:  # torch.load raises many types for a foreign or corrupt file
        raise UsageError(
            f"--calib-data {path}: not a torch.save'd list of input tuples "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if not isinstance(data, (list, tuple)) or not data:
        raise UsageError(
            f"--calib-data {path}: expected a non-empty list of input tuples, got "
            f"{type(data).__name__}{' (empty)' if isinstance(data, (list, tuple)) else ''}"
        )
    return list(data)


def _program_inputs(program: Path, calib: Path | None) -> tuple[JobInputs, torch.fx.GraphModule]:
    if not program.is_file():
        raise UsageError(f"--program {program}: no such file")
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.ERROR)  # torch.export.load logs a traceback before it raises
    try:
        if not zipfile.is_zipfile(program):
            raise zipfile.BadZipFile("not a zip archive")
        gm = torch.export.load(str(program)).module()
    except Exception as exc:  # a foreign or truncated archive: many exception types
        raise UsageError(
            f"--program {program}: not a torch.export program (.pt2) "
            f"({type(exc).__name__}); save one with torch.export.save"
        ) from None
    finally:
        export_log.setLevel(level)
    if calib is None:
        raise UsageError(f"--program {program} needs --calib-data: a torch.save'd list of input tuples")
    batches = check_batches(_load_calib(calib), input_shapes(gm), what=f"--calib-data {calib}")
    split = max(1, len(batches) - max(1, len(batches) // 8))
    return JobInputs(program.stem, gm, batches[:split], batches[split:] or batches[-1:]), gm


def _default_inputs(args: argparse.Namespace) -> JobInputs:
    """Whisper tiny.en's encoder with the bundled clips, or with --calib-data when its
    inputs fit the encoder (log-mel (1, 80, 3000) tensors)."""
    from esc_ao.speech import bundled_clips

    n = len(bundled_clips("calibration"))
    if args.calib_clips is not None and not 1 <= args.calib_clips <= n:
        raise UsageError(f"--calib-clips {args.calib_clips}: use 1..{n} (the bundled calibration clips)")
    if args.calib_data is not None and args.calib_clips is not None:
        raise UsageError("--calib-clips selects bundled clips and --calib-data replaces them: give one")
    inputs = whisper_default(args.calib_clips)
    if args.calib_data is not None:
        expected = [tuple(inputs.calibration[0][0].shape)]
        inputs.calibration = check_batches(
            _load_calib(args.calib_data),
            expected,
            what=f"--calib-data {args.calib_data} (for Whisper tiny.en's encoder, " f"log-mel {expected[0]})",
        )
        inputs.notes = {**inputs.notes, "calibration_voices": [f"--calib-data {args.calib_data}"]}
    return inputs


def _check_out(out: Path, flag: str = "--out") -> None:
    """``out`` can be created (or written) here: probed with a directory made and removed
    in its nearest existing ancestor, so a long job cannot fail at its last step."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out}: exists and is not a directory")
    ancestor = out
    while not ancestor.exists():
        ancestor = ancestor.parent
    try:
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".esc-ao-probe-"))
    except OSError as exc:
        raise UsageError(
            f"{flag} {out}: cannot write under {ancestor} ({exc.strerror}); pass a writable " "directory"
        ) from None


def _npu_target(args: argparse.Namespace) -> NpuTarget | None:
    """The Ethos-U accelerator ``--target`` names, or None for an EscQuantizer target."""
    if args.target in TARGETS:
        if args.a16w8:
            raise UsageError(f"--a16w8 is for Ethos-U targets; --target {args.target} takes --act-bits")
        return None
    if not args.target.startswith("ethos-u"):
        raise UsageError(f"--target {args.target}: use {', '.join(TARGETS)} or an Ethos-U accelerator (ethos-u85-256)")
    from esc_ao.lower.ethosu import check_accelerator

    check_accelerator(args.target)  # a ValueError listing Vela's names, an ImportError naming the packages
    return NpuTarget(args.target, a16w8=args.a16w8)


def _quantize(args: argparse.Namespace) -> int:
    config = QuantConfig(
        weight_bits=args.weight_bits, act_bits=args.act_bits, method=args.method, act_symmetric=not args.affine
    )
    try:
        search = SearchConfig(
            budget=args.budget,
            popsize=args.popsize,
            sigma0=args.sigma0,
            seed=args.seed,
            stages=args.stages,
            stage_budget=args.stage_budget,
            subsample=args.subsample or None,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    _check_out(args.out)
    if args.checkpoint is not None:
        if args.method != "esc":
            raise UsageError(f"--checkpoint is the ESC search's state; --method {args.method} has no search")
        _check_out(args.checkpoint.parent, "--checkpoint")
        if args.checkpoint.exists():
            load_checkpoint(args.checkpoint)  # a foreign or corrupt file: refused now, not after the export
    if args.program is not None:
        if args.calib_clips is not None:
            raise UsageError(
                "--calib-clips picks bundled clips for the default model; with --program give " "--calib-data"
            )
        inputs, graph = _program_inputs(args.program, args.calib_data)
    else:
        inputs, graph = _default_inputs(args), None
    # Under torchrun every rank runs the job (the search is sharded); only rank 0 writes.
    driver = os.environ.get("RANK", "0") == "0"
    npu = _npu_target(args)
    default = main_job_recipe("reference" if npu else args.target, args.weight_bits)
    try:  # Recipe checks the combination (--residual/--attention-probs with --target, the budget's range)
        if args.rotate_block is not None and not args.rotate:
            raise ValueError(f"--rotate-block {args.rotate_block} needs --rotate")
        recipe = dataclasses.replace(
            default,
            residual=args.residual or default.residual,
            smooth=default.smooth and not args.no_smooth,
            gptq=args.gptq if args.gptq is not None else default.gptq,
            conv_8bit=args.conv_8bit if args.conv_8bit is not None else default.conv_8bit,
            weight_group=args.weight_group,
            precision_budget=args.precision_budget,
            rotate=args.rotate,
            rotate_block=args.rotate_block,
            probs16=args.attention_probs == "int16",
            attention=args.attention or default.attention,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.weight_group is not None and not args.no_pte:
        raise UsageError(
            "--weight-group has no ExecuTorch kernel with static int8 inputs, so no .pte can hold "
            "it: add --no-pte (model.pt2 keeps the group-wise program)"
        )
    report = quantize_job(
        inputs,
        config,
        args.out if driver else None,
        keep_float=args.keep_float,
        graph=graph,
        search=search,
        objective=objective_by_name(args.objective),
        checkpoint=args.checkpoint if driver else None,
        write_pte=not args.no_pte,
        recipe=recipe,
        npu=npu,
    )
    if not driver:
        return 0
    print(
        f"{report.model} {config.label} {config.method}{'' if npu else recipe.suffix} ({args.target}): "
        f"output SQNR {report.output_sqnr_db:.2f} dB on {report.heldout_batches} held-out batch(es); "
        f"wrote {args.out}/model.pt2, report.md, report.json"
        f"{'' if args.no_pte else ', ethosu/ (model.pte, .tosa, Vela)' if npu else ', model.pte'} "
        f"({report.total_seconds or 0:.0f} s)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs a command; an error is one line on stderr (exit 2: a value that cannot work,
    1: a failure while working), with its traceback only under --debug."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error argparse printed (2): a code, not an exception
        return exc.code if isinstance(exc.code, int) else 2
    name = " ".join(filter(None, ["esc-ao", args.command, getattr(args, "bench", None)]))
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        print(f"{name}: {text}", file=sys.stderr)
        # Bad values (ValueError and its kinds, a missing input file) are usage errors.
        return 2 if isinstance(exc, (ValueError, FileNotFoundError)) else 1


def _dispatch(args: argparse.Namespace) -> int:
    command: Callable[[argparse.Namespace], int] = args.func  # each subcommand's set_defaults
    return command(args)


def _baselines(args: argparse.Namespace) -> int:
    from esc_ao.bench.baselines import run_baselines

    run_baselines(args.out, args.calib_clips)
    return 0


def _esc_bench(args: argparse.Namespace) -> int:
    from esc_ao.bench.esc import run_esc_bench

    run_esc_bench(
        args.out,
        args.bits,
        SearchConfig(budget=args.budget, popsize=args.popsize, seed=args.seed),
        args.calib_clips,
    )
    return 0


def _speed_bench(args: argparse.Namespace) -> int:
    from esc_ao.bench.speed import run_speed_bench

    run_speed_bench(
        args.models,
        args.variants,
        args.runs,
        args.rounds,
        args.out,
        args.work,
        args.reuse,
        args.lower_only,
        threads=args.threads,
        profile_runs=args.profile_runs,
    )
    return 0


def _npu_bench(args: argparse.Namespace) -> int:
    from esc_ao.bench.npu import rerender, run_npu_bench

    if args.render_only:
        rerender(args.out)
        return 0
    if args.tosa_limit is not None and args.tosa_limit < 1:
        raise UsageError(f"--tosa-limit {args.tosa_limit}: give a positive count, or leave it out to score all")
    command = " ".join(
        ["esc-ao bench npu", "--models", *args.models, "--methods", *args.methods, "--target", args.target]
    )
    if args.tosa_limit is not None:
        command += f" --tosa-limit {args.tosa_limit}"
    if args.a16w8:
        command += " --a16w8"
    run_npu_bench(
        args.models,
        args.methods,
        args.target,
        args.out,
        args.work,
        args.calib_samples,
        args.seed,
        args.tosa_limit,
        command,
        args.a16w8,
    )
    return 0


def _accuracy_bench(args: argparse.Namespace) -> int:
    from esc_ao.bench.accuracy import AccuracySettings, render, run_accuracy_bench
    from esc_ao.bench.accuracy_table import stale_cells

    settings = AccuracySettings(
        n_calibration=args.calib_samples,
        seed=args.seed,
        budget=args.budget,
        popsize=args.popsize,
        stages=args.stages,
        stage_budget=args.stage_budget,
    )
    if args.prune:
        stale = stale_cells(args.cells)
        for path in stale:
            path.unlink()
        print(f"{len(stale)} cells of older keys deleted from {args.cells}")
    if args.render_only or args.prune:
        print(f"{len(render(args.out, args.cells, settings))} cells rendered to {args.out}/accuracy.md")
        return 0
    from esc_ao.corpus import MissingEngineError, MissingSourceError
    from esc_ao.speech import WhisperWeightsError

    try:
        run_accuracy_bench(args.models, args.methods, args.bits, args.out, args.cells, settings, args.eval_sets)
    # a missing TTS engine, real-speech package or weights package: what to install (usage, not failure)
    except (MissingEngineError, MissingSourceError, WhisperWeightsError) as exc:
        raise UsageError(str(exc)) from exc
    return 0


def _corpus(args: argparse.Namespace) -> int:
    from esc_ao.corpus import CORPORA, load_corpus, load_real_corpus

    valid = [*CORPORA, "real-asr"]
    unknown = [n for n in args.names if n not in valid]
    if unknown:
        print(f"esc-ao corpus: corpus {unknown[0]!r} is unknown: use one of {', '.join(valid)}", file=sys.stderr)
        return 2
    for name in args.names:
        try:
            corpus = load_real_corpus() if name == "real-asr" else load_corpus(name)
        except (ValueError, RuntimeError) as exc:  # unknown name, missing TTS engine or real-speech package
            print(f"esc-ao corpus: {exc}", file=sys.stderr)
            return 2
        print(
            f"corpus {name}: {len(corpus.manifest['items'])} clips at {corpus.root} "
            f"(fingerprint {corpus.manifest['fingerprint']})"
        )
    return 0


def _calib_bench(args: argparse.Namespace) -> int:
    from esc_ao.bench.esc import run_calib_bench

    run_calib_bench(args.bits, SearchConfig(budget=args.budget, popsize=args.popsize, progress=False), args.calib_clips)
    return 0


def _search_bench(args: argparse.Namespace) -> int:
    from esc_ao.bench.search_cost import run_search_bench

    if args.test_utterances < 1:
        raise UsageError(f"--test-utterances {args.test_utterances}: use >= 1")
    base = SearchConfig(popsize=args.popsize, seed=args.seed, progress=False)
    run_search_bench(args.out, args.variants, args.test_utterances, base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
