"""The search checkpoint as data only: JSON holding numbers, strings, lists and numeric
arrays, so that resuming from a file copied from anywhere cannot run code (a pickle can).

What is saved: ESC's search state (generation history, best candidate, local-step start,
NumPy's global RNG state that pycma samples from) and pycma's CMA-ES state. pycma offers
only pickling, so its state is taken as every data value reachable through the
attributes of its own objects (mean, step size, covariance and its eigendecomposition,
evolution paths, counters, the last population), and restored into a freshly built
``CMAEvolutionStrategy`` with the same options, attribute path by attribute path. Objects
are never created from the file: a path that does not lead through the fresh object's
own attributes is refused. Resuming is bit-identical to an uninterrupted run (tested
after SIGKILL).

Encoding: floats through ``repr`` (exact round trip), arrays as
``{"__array__": dtype, "shape": [...], "data": [...]}`` for bool/int/float dtypes only,
NumPy scalars as ``{"__scalar__": dtype, "value": v}``, tuples as ``{"__tuple__": [...]}``,
ranges as ``{"__range__": [start, stop, step]}``,
dicts with non-string keys as ``{"__items__": [[k, v], ...]}``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from esc_ao.atomic import atomic_path

__all__ = ["CheckpointError", "load_checkpoint", "restore_object", "object_state", "save_checkpoint"]

FORMAT = "esc-ao search checkpoint"
VERSION = 1
_DTYPE_KINDS = "biuf"  # bool, signed, unsigned, float: no object or void arrays
# pycma attributes that are not search state: options (rebuilt from the same SearchConfig,
# which the fingerprint pins), its file logger (and its back-reference), wall-clock timers.
_SKIP = frozenset({"opts", "inopts", "inputargs", "_es_opts", "logger", "timer"})


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: another model or search configuration, or a
    file that is not (or no longer wholly) an esc-ao checkpoint."""


# --- values <-> JSON trees ---------------------------------------------------------------


def encode(value: Any) -> Any:
    """A JSON-able tree of ``value`` (see the module doc); TypeError for anything else."""
    if isinstance(value, np.generic):  # before float: np.float64 is a float
        if value.dtype.kind not in _DTYPE_KINDS:
            raise TypeError(f"scalar of dtype {value.dtype} cannot be checkpointed as data")
        return {"__scalar__": value.dtype.str, "value": value.item()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in _DTYPE_KINDS:
            raise TypeError(f"array of dtype {value.dtype} cannot be checkpointed as data")
        # Fortran order kept: BLAS may sum in another order on another layout (pycma's
        # eigenvectors come out of eigh in Fortran order), and resuming must be bit-exact.
        order = "F" if value.flags.f_contiguous and not value.flags.c_contiguous else "C"
        return {
            "__array__": value.dtype.str,
            "shape": list(value.shape),
            "order": order,
            "data": value.ravel(order="F" if order == "F" else "C").tolist(),
        }
    if type(value) is tuple:
        return {"__tuple__": [encode(v) for v in value]}
    if type(value) is range:
        return {"__range__": [value.start, value.stop, value.step]}
    if type(value) is list:
        return [encode(v) for v in value]
    if type(value) is dict:
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode(v) for k, v in value.items()}
        return {"__items__": [[encode(k), encode(v)] for k, v in value.items()]}
    raise TypeError(f"{type(value).__module__}.{type(value).__qualname__} is not checkpoint data")


def decode(tree: Any) -> Any:
    """The value of an ``encode`` tree; ValueError for anything ``encode`` cannot write."""
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if isinstance(tree, list):
        return [decode(v) for v in tree]
    if not isinstance(tree, dict):
        raise ValueError(f"unexpected {type(tree).__name__} in checkpoint data")
    if "__array__" in tree:
        dtype = _dtype(tree["__array__"])
        shape = [int(n) for n in tree["shape"]]
        data = np.asarray(tree["data"], dtype=dtype)
        return data.reshape(shape, order="F") if tree.get("order") == "F" else data.reshape(shape, order="C")
    if "__scalar__" in tree:
        return _dtype(tree["__scalar__"]).type(tree["value"])
    if "__tuple__" in tree:
        return tuple(decode(v) for v in tree["__tuple__"])
    if "__range__" in tree:
        return range(*(int(v) for v in tree["__range__"]))
    if "__items__" in tree:
        return {_hashable(decode(k)): decode(v) for k, v in tree["__items__"]}
    if any(k.startswith("__") for k in tree):
        raise ValueError(f"unknown marker {sorted(tree)[0]!r} in checkpoint data")
    return {k: decode(v) for k, v in tree.items()}


def _dtype(text: Any) -> np.dtype:
    dtype = np.dtype(str(text))
    if dtype.kind not in _DTYPE_KINDS:
        raise ValueError(f"dtype {text!r} is not numeric checkpoint data")
    return dtype


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


# --- an object's state as attribute paths --------------------------------------------------


def object_state(obj: Any, package: str) -> dict[str, Any]:
    """Every data value reachable from ``obj`` through attributes of objects whose class
    lives in ``package`` (e.g. "cma"), by dotted attribute path, encoded. Methods and
    functions are skipped (the fresh object has its own)."""
    out: dict[str, Any] = {}
    seen: set[int] = set()
    arrays: dict[int, str] = {}  # one array held by two attributes (pycma's es.B is es.sm.B) stays one

    def walk(o: Any, path: str) -> None:
        if id(o) in seen:
            return
        seen.add(id(o))
        for name, value in vars(o).items():
            if name in _SKIP:
                continue
            where = f"{path}.{name}" if path else name
            if _owned(value, package):
                walk(value, where)
            elif callable(value) and not isinstance(value, (np.ndarray, np.generic)):
                continue
            elif _holds_owned(value, package):
                continue  # structure (e.g. a dict holding the options object): rebuilt by the constructor
            elif isinstance(value, np.ndarray) and id(value) in arrays:
                out[where] = {"__same_as__": arrays[id(value)]}
            else:
                if isinstance(value, np.ndarray):
                    arrays[id(value)] = where
                try:
                    out[where] = encode(value)
                except TypeError as exc:
                    raise TypeError(f"attribute {where}: {exc}") from None

    walk(obj, "")
    return out


def restore_object(obj: Any, state: dict[str, Any], package: str) -> None:
    """Writes ``object_state`` values back into a freshly built ``obj`` of the same kind.

    Raises:
        CheckpointError: a path does not lead through ``obj``'s own ``package`` objects.
    """
    restored: dict[str, Any] = {}
    for path, tree in state.items():
        *parents, name = path.split(".")
        target = obj
        for part in parents:
            target = getattr(target, part, None)
            if not _owned(target, package):
                raise CheckpointError(f"checkpoint path {path!r} does not match this version's {package} objects")
        if not hasattr(target, "__dict__") or name.startswith("__"):
            raise CheckpointError(f"checkpoint path {path!r} does not match this version's {package} objects")
        if isinstance(tree, dict) and "__same_as__" in tree:
            if tree["__same_as__"] not in restored:
                raise CheckpointError(
                    f"checkpoint path {path!r} shares an array with {tree['__same_as__']!r}, "
                    "which comes later or not at all"
                )
            value = restored[tree["__same_as__"]]
        else:
            value = decode(tree)
        restored[path] = value
        setattr(target, name, value)


def _holds_owned(value: Any, package: str) -> bool:
    if type(value) in (list, tuple):
        return any(_owned(v, package) or _holds_owned(v, package) for v in value)
    if type(value) is dict:
        return any(_owned(v, package) or _holds_owned(v, package) for v in value.values())
    return False


def _owned(value: Any, package: str) -> bool:
    module = type(value).__module__
    return (
        (module == package or module.startswith(package + "."))
        and hasattr(value, "__dict__")
        and not isinstance(value, type)
    )


# --- files -----------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Writes ``state`` (encodable values) atomically, synced to disk."""
    text = json.dumps({"format": FORMAT, "version": VERSION, "state": encode(state)}, allow_nan=True)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state ``save_checkpoint`` wrote.

    Raises:
        CheckpointError: naming the file, when it is not JSON (truncated, binary, an
            older pickle checkpoint), not an esc-ao checkpoint, or of another version.
    """
    try:
        doc = json.loads(Path(path).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is not an esc-ao checkpoint (not JSON, or truncated: {exc}); "
            "delete it or pass another --checkpoint path"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} is JSON but not an esc-ao search checkpoint (no "
            f'"format": "{FORMAT}"); delete it or pass another path'
        )
    if doc.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {doc.get('version')!r}, this esc-ao reads "
            f"{VERSION}; delete it to start the search afresh"
        )
    try:
        state = decode(doc.get("state"))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} holds data this version cannot read: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: the state is a {type(state).__name__}, not a mapping")
    return state
