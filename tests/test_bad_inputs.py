"""The catalogue of bad inputs: every one answered by one line naming the value and the
fix (exit code 2 on the command line), never a traceback, never silently ignored, and no
partial output left behind."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import pytest
import torch

from esc_ao.cli import main

_MEL = (1, 80, 3000)  # the default model's input: Whisper tiny.en's log-mel


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Input files the cases refer to, made once."""
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).eval()
    torch.export.save(torch.export.export(model, (torch.randn(3, 16),)), str(root / "mlp.pt2"))
    made = {
        "mlp.pt2": root / "mlp.pt2",
        "calib.pt": [(torch.randn(3, 16),) for _ in range(4)],
        "pair.pt": [(torch.randn(3, 16), torch.randn(3, 16))],
        "nan.pt": [(torch.full(_MEL, float("nan")),)],
        "short.pt": [(torch.zeros(1, 80, 100),)],
        "empty.pt": [],
        "garbage.pt": b"\x00not a torch file\xff",
        "garbage.pt2": b"PK\x03\x04 not an archive",
        "garbage.ckpt": b"\x80\x04garbage",
        "afile": b"",
    }
    out: dict[str, Path] = {}
    for name, value in made.items():
        path = root / name
        if isinstance(value, bytes):
            path.write_bytes(value)
        elif isinstance(value, list):
            torch.save(value, path)
        out[name] = path
    return out


# (arguments, expected message); {f:NAME} is a file from the fixture, {out} the output directory
CLI_CASES: list[tuple[str, str]] = [
    ("quantize --calib-clips 0", r"--calib-clips 0: use 1\.\.12"),
    ("quantize --calib-clips 99", r"--calib-clips 99: use 1\.\.12"),
    ("quantize --budget -1", r"budget=-1 must be >= 0"),
    ("quantize --popsize 2", r"popsize=2 is below CMA-ES's minimum of 4"),
    ("quantize --sigma0 0", r"sigma0=0\.0 must lie in \(0, 2\]"),
    ("quantize --weight-bits 3", r"--weight-bits: invalid choice: 3"),
    ("quantize --method foo", r"--method: invalid choice: 'foo'"),
    ("quantize --residual int16", r"'int16' on the XNNPACK target"),
    ("quantize --attention-probs int16", r"\+p16\) on the XNNPACK target"),
    ("quantize --rotate-block 64", r"--rotate-block 64 needs --rotate"),
    ("quantize --rotate --rotate-block 48", r"rotate_block=48 needs rotate=True and a power of two"),
    ("quantize --precision-budget 1.5", r"precision_budget=1\.5 must lie in \(0, 1\]"),
    ("quantize --target reference --weight-group 12 --no-pte", r"weight_group=12 must be None .* power of two"),
    ("quantize --weight-group 32", r"XNNPACK runs group-wise weights only with dynamic"),
    ("quantize --out /proc/esc-ao-out", r"--out /proc/esc-ao-out: cannot write under /proc"),
    ("quantize --out {f:afile}", r"--out .*afile: exists and is not a directory"),
    ("quantize --checkpoint {f:garbage.ckpt}", r"checkpoint .*garbage\.ckpt is not an esc-ao checkpoint"),
    ("quantize --method mse --checkpoint {out}/s.ckpt", r"--checkpoint is the ESC search's state; --method mse"),
    ("quantize --calib-data {f:nan.pt}", r"batch 0 input 0 has NaN or Inf values"),
    (
        "quantize --calib-data {f:short.pt}",
        r"batch 0 input 0 has shape \(1, 80, 100\), the model takes \(1, 80, 3000\)",
    ),
    ("quantize --calib-data {f:empty.pt}", r"expected a non-empty list of input tuples, got list \(empty\)"),
    ("quantize --calib-data {f:garbage.pt}", r"garbage\.pt: not a torch\.save'd list of input tuples"),
    ("quantize --calib-data /no/such/calib.pt", r"--calib-data /no/such/calib\.pt: no such file"),
    ("quantize --calib-data {f:calib.pt} --calib-clips 2", r"give one"),
    ("quantize --program /no/such.pt2", r"--program /no/such\.pt2: no such file"),
    ("quantize --program {f:garbage.pt2} --calib-data {f:calib.pt}", r"not a torch\.export program \(\.pt2\)"),
    ("quantize --program {f:mlp.pt2}", r"mlp\.pt2 needs --calib-data"),
    ("quantize --program {f:mlp.pt2} --calib-data {f:pair.pt}", r"batch 0 has 2 input\(s\), the model takes 1"),
    (
        "quantize --program {f:mlp.pt2} --calib-data {f:short.pt}",
        r"batch 0 input 0 has shape \(1, 80, 100\), the model " r"takes \(3, 16\)",
    ),
    ("quantize --program {f:mlp.pt2} --calib-data {f:calib.pt} --calib-clips 2", r"with --program give --calib-data"),
    (
        "quantize --program {f:mlp.pt2} --calib-data {f:calib.pt} --method max --keep-float 00",
        r"module name '00' \(set_module_name, --keep-float\) matches nothing .*closest: 0",
    ),
    ("bench speed --models nosuchmodel", r"unknown model 'nosuchmodel'"),
    ("bench accuracy --models nosuchmodel", r"unknown model 'nosuchmodel'"),
    ("bench accuracy --methods mse+foo --models ast", r"unknown recipe flag\(s\) foo"),
    ("corpus nosuchcorpus", r"corpus 'nosuchcorpus' is unknown"),
    ("nosuchcommand", r"invalid choice: 'nosuchcommand'"),
]


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize("args, message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_command_line(args: str, message: str, files: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = [
        re.sub(r"\{f:([^}]+)\}", lambda m: str(files[m.group(1)]), a).replace("{out}", str(out)) for a in args.split()
    ]
    if argv[0] == "quantize" and "--out" not in argv:
        argv += ["--out", str(out)]
    before = _files_under(tmp_path) | _files_under(files["mlp.pt2"].parent)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("esc-ao")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(message, lines[0]), lines[0]
    assert _files_under(tmp_path) | _files_under(files["mlp.pt2"].parent) == before  # nothing left behind


def _quantizer_with(**overrides: object):  # type: ignore[no-untyped-def]
    from esc_ao import EscQuantizer

    q = EscQuantizer()
    for name, value in overrides.items():
        getattr(q, name)(*value)  # type: ignore[misc]
    return q


def _api_cases() -> list[tuple[str, Callable[[], object], type[Exception], str]]:
    from esc_ao import EscQuantizer, QuantConfig, SearchConfig, calibrate, convert, export_model, observe, prepare
    from esc_ao.pipeline import CalibrationDataError, check_batches
    from esc_ao.recipe import Recipe, split_method
    from esc_ao.search.calibrate import CheckpointError
    from esc_ao.search.space import NoObserversError

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    x = (torch.randn(2, 8),)

    def prepared(quantizer: EscQuantizer | None = None):  # type: ignore[no-untyped-def]
        return prepare(export_model(mlp, x), quantizer or EscQuantizer(QuantConfig(method="max")))

    def converted():  # type: ignore[no-untyped-def]
        p = prepared()
        observe(p, [x])
        return convert(p)

    return [
        ("QuantConfig(weight_bits=3)", lambda: QuantConfig(weight_bits=3), ValueError, r"weight_bits=3 .* use 8 or 4"),
        ("QuantConfig(method='foo')", lambda: QuantConfig(method="foo"), ValueError, r"method='foo' is unknown"),
        ("QuantConfig(histogram_bins=100)", lambda: QuantConfig(histogram_bins=100), ValueError, r"power of two"),
        ("SearchConfig(log_bounds=(1, 2))", lambda: SearchConfig(log_bounds=(1.0, 2.0)), ValueError, r"bracket 0"),
        ("SearchConfig(stages=0)", lambda: SearchConfig(stages=0), ValueError, r"stages=0 must be >= 1"),
        ("SearchConfig(stage_budget=-1)", lambda: SearchConfig(stage_budget=-1), ValueError, r"stage_budget=-1"),
        ("SearchConfig(subsample=0)", lambda: SearchConfig(subsample=0), ValueError, r"subsample=0 must be >= 1"),
        ("EscQuantizer(target='npu')", lambda: EscQuantizer(target="npu"), ValueError, r"target='npu' is not one of"),
        ("set_module_name('')", lambda: EscQuantizer().set_module_name("", None), ValueError, r"non-empty"),
        (
            "set_module_name(no match)",
            lambda: prepared(_quantizer_with(set_module_name=("00", None))),
            ValueError,
            r"module name '00' .* matches nothing .*closest: 0",
        ),
        (
            "set_module_type(no match)",
            lambda: prepared(_quantizer_with(set_module_type=("torch.nn.Conv1d", None))),
            ValueError,
            r"module type 'torch.nn.Conv1d' .* matches nothing",
        ),
        (
            "set_node_name(no match)",
            lambda: prepared(_quantizer_with(set_node_name=("linear_9", None))),
            ValueError,
            r"node name 'linear_9' .* matches nothing .*closest: linear",
        ),
        ("observe([])", lambda: observe(prepared(), []), CalibrationDataError, r"no calibration batches"),
        (
            "calibrate(converted)",
            lambda: calibrate(converted(), [x], config=SearchConfig(budget=1, progress=False)),
            NoObserversError,
            r"no activation observers found",
        ),
        (
            "check_batches(NaN)",
            lambda: check_batches([(torch.tensor([1.0, float("inf")]),)]),
            CalibrationDataError,
            r"batch 0 input 0 has NaN or Inf",
        ),
        ("check_batches(str)", lambda: check_batches([("text",)]), CalibrationDataError, r"batch 0 input 0 is a str"),
        ("Recipe(precision_budget=0)", lambda: Recipe(precision_budget=0.0), ValueError, r"must lie in \(0, 1\]"),
        ("split_method('mse+foo')", lambda: split_method("mse+foo"), ValueError, r"unknown recipe flag\(s\) foo"),
        ("load_checkpoint(garbage)", lambda: _load_garbage_checkpoint(), CheckpointError, r"not an esc-ao checkpoint"),
    ]


def _load_garbage_checkpoint() -> None:
    import tempfile

    from esc_ao.search.checkpoint import load_checkpoint

    with tempfile.NamedTemporaryFile(suffix=".ckpt") as f:
        f.write(b"\x80\x04\x95")
        f.flush()
        load_checkpoint(Path(f.name))


API_NAMES = [c[0] for c in _api_cases()]


@pytest.mark.parametrize("name", API_NAMES)
def test_python_api(name: str) -> None:
    _, call, exc_type, message = next(c for c in _api_cases() if c[0] == name)
    with pytest.raises(exc_type) as info:
        call()
    text = str(info.value)
    assert "\n" not in text and re.search(message, text), text


def test_the_catalogue_covers_at_least_25_bad_inputs() -> None:
    assert len(CLI_CASES) + len(API_NAMES) >= 25
