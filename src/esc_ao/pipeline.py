"""The PT2E flow as plain calls: export -> prepare -> observe -> convert -> save.

Each step is usable alone; each turns the failures users hit into exceptions that name
the value and the fix.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch.fx import GraphModule
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer import Quantizer

from esc_ao.atomic import atomic_path
from esc_ao.observers import observer_mode

__all__ = [
    "load_program",
    "CalibrationDataError",
    "ExportError",
    "Batch",
    "as_batches",
    "check_batches",
    "input_shapes",
    "convert",
    "export_model",
    "observe",
    "prepare",
    "save_program",
]

log = logging.getLogger(__name__)

Batch = tuple[Any, ...]


class ExportError(RuntimeError):
    """torch.export could not capture the model."""


class CalibrationDataError(ValueError):
    """The calibration data cannot be used."""


_HELPERS = (
    "for torchaudio's Conformer use esc_ao.speech.ExportableConformer, for wav2vec2 "
    "esc_ao.speech.ExportableWav2Vec2, for openai-whisper esc_ao.speech.WhisperEncoder / "
    "WhisperDecoderForScoring"
)


def export_model(model: torch.nn.Module, example_inputs: Batch, dynamic_shapes: Any = None) -> GraphModule:
    """torch.export the model (eval mode) and return the graph module PT2E works on.
    ``dynamic_shapes`` is passed to torch.export (e.g. a variable number of frames).

    Raises:
        ExportError: naming the failing operation and pointing to the speech helpers.
    """
    if not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs must be a tuple of model inputs, got {type(example_inputs).__name__}")
    model = model.eval()
    try:
        program = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # torch raises many types here; all mean "not exportable"
        raise ExportError(
            f"torch.export failed on {type(model).__name__}: {_first_lines(exc)}\n"
            f"Make the forward traceable (no .item(), no data-dependent Python control flow); {_HELPERS}."
        ) from exc
    return program.module()


def _first_lines(exc: BaseException, n: int = 3) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return " | ".join(lines[:n]) if lines else type(exc).__name__


def prepare(gm: GraphModule, quantizer: Quantizer) -> GraphModule:
    """prepare_pt2e with a check that it was handed an exported graph."""
    if not isinstance(gm, GraphModule):
        raise TypeError(
            f"prepare expects the GraphModule of torch.export.export(...).module(), got "
            f"{type(gm).__name__}: call esc_ao.export_model(model, example_inputs) first"
        )
    return prepare_pt2e(gm, quantizer)


def as_batches(data: Iterable[Any]) -> list[Batch]:
    """Normalises calibration data to a list of input tuples.

    Raises:
        CalibrationDataError: no batches.
    """
    batches = [b if isinstance(b, tuple) else (b,) for b in data]
    if not batches:
        raise CalibrationDataError(
            "no calibration batches: pass a non-empty list of model inputs "
            "(the ESC paper uses 100 utterances from the training split)"
        )
    return batches


def input_shapes(gm: GraphModule) -> list[tuple[int, ...] | None]:
    """The static shape of each user input of an exported graph (None where a dimension
    is symbolic or the input is not a tensor)."""
    shapes: list[tuple[int, ...] | None] = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and all(isinstance(d, int) for d in val.shape):
            shapes.append(tuple(int(d) for d in val.shape))
        else:
            shapes.append(None)
    return shapes


def check_batches(
    data: Iterable[Any], expected: Sequence[tuple[int, ...] | None] | None = None, what: str = "calibration data"
) -> list[Batch]:
    """``as_batches`` plus the checks a user's data needs before minutes of work: every
    input a tensor, floating-point inputs finite, and, with ``expected`` (e.g.
    ``input_shapes(graph)``), as many inputs per batch as the model takes, of its shapes.

    Raises:
        CalibrationDataError: naming the batch index, the input and what was expected.
    """
    batches = as_batches(data)
    for i, batch in enumerate(batches):
        if expected is not None and len(batch) != len(expected):
            raise CalibrationDataError(
                f"{what}: batch {i} has {len(batch)} input(s), the model takes " f"{len(expected)}"
            )
        for j, x in enumerate(batch):
            if not isinstance(x, torch.Tensor):
                raise CalibrationDataError(f"{what}: batch {i} input {j} is a {type(x).__name__}, not a tensor")
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise CalibrationDataError(f"{what}: batch {i} input {j} has NaN or Inf values; clean or drop it")
            want = expected[j] if expected is not None else None
            if want is not None and tuple(x.shape) != want:
                raise CalibrationDataError(
                    f"{what}: batch {i} input {j} has shape {tuple(x.shape)}, the model " f"takes {want}"
                )
    return batches


@torch.no_grad()
def observe(prepared: GraphModule, data: Iterable[Any]) -> int:
    """Runs the calibration batches through the prepared model so observers record
    statistics; returns the number of batches.

    Raises:
        CalibrationDataError: no batches, or no esc_ao/torchao observer in the model.
        NonFiniteActivationError: a batch produced NaN/Inf (names the tensor).
    """
    batches = as_batches(data)
    if not _has_any_observer(prepared):
        raise CalibrationDataError(
            "the model has no observers: pass the output of prepare_pt2e (not the float or converted model)"
        )
    with observer_mode(prepared, observing=True, fake_quant=False):
        for batch in batches:
            prepared(*batch)
    return len(batches)


def _has_any_observer(model: torch.nn.Module) -> bool:
    from torchao.quantization.pt2e.observer import ObserverBase

    return any(isinstance(m, ObserverBase) for m in model.modules())


def convert(prepared: GraphModule) -> GraphModule:
    """convert_pt2e after turning fake-quant off (the observers become q/dq ops)."""
    with observer_mode(prepared, observing=False, fake_quant=False):
        converted = convert_pt2e(prepared)
    _drop_unused_attributes(converted)
    return converted


def _drop_unused_attributes(gm: GraphModule) -> None:
    # convert_pt2e folds each weight into an int8 constant but leaves the float parameter
    # on the module; torch.export would then save both and the "quantized" file would be
    # larger than the float one. Delete every parameter/buffer no get_attr reads.
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    names = [n for n, _ in gm.named_parameters()] + [n for n, _ in gm.named_buffers()]
    for name in names:
        if name not in used and not any(u.startswith(name + ".") for u in used):
            owner_name, _, attr = name.rpartition(".")
            owner = gm.get_submodule(owner_name) if owner_name else gm
            delattr(owner, attr)
    gm.delete_all_unused_submodules()


def save_program(model: torch.nn.Module, example_inputs: Sequence[Any], path: Path) -> int:
    """torch.export the (converted) model and save it atomically; returns the file size.

    Nothing is left at ``path`` if any step fails.
    """
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise FileNotFoundError(f"cannot write {path}: directory {path.parent} does not exist")
    program = torch.export.export(model, tuple(example_inputs))
    with atomic_path(path, suffix=".pt2") as tmp:  # torch.export.save warns about any other suffix
        torch.export.save(program, tmp)
    return path.stat().st_size


def load_program(path: str | Path) -> torch.nn.Module:
    """A program ``save_program`` (or ``esc-ao quantize``: ``model.pt2``) wrote, as a
    callable module. Use it rather than a bare ``torch.export.load``: the program's
    quantize/dequantize ops are registered by torchao's PT2E module, which this module
    imports, and a fresh process without it cannot deserialise them.

    Raises:
        FileNotFoundError: naming ``path``.
        ValueError: naming ``path``, when it is not a saved torch.export program.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no program at {path}: pass the model.pt2 that esc-ao quantize or save_program wrote")
    try:
        program = torch.export.load(str(path))
    except (zipfile.BadZipFile, RuntimeError) as exc:  # torch raises either for a file that is not an archive
        raise ValueError(
            f"{path} is not a saved torch.export program ({exc}): pass the model.pt2 that esc-ao quantize or "
            "save_program wrote"
        ) from exc
    return program.module()
