"""The search checkpoint is data only: exact round trips of what the search saves, and a
one-line CheckpointError naming the file for anything else (resuming bit-identically
after SIGKILL is tested in test_calibrate)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import cma
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esc_ao.search.checkpoint import (
    CheckpointError,
    decode,
    encode,
    load_checkpoint,
    object_state,
    restore_object,
    save_checkpoint,
)

_floats = st.floats(allow_nan=False, width=64)
_leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**62), 2**62), _floats, st.text(max_size=8))
_ranges = st.builds(range, st.integers(-5, 5), st.integers(-5, 20), st.integers(1, 3))
_values = st.recursive(
    st.one_of(_leaves, _ranges),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=4).filter(lambda k: not k.startswith("__")), inner, max_size=3),
        st.dictionaries(st.integers(0, 9), inner, max_size=3),
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(value=_values)
def test_values_round_trip_exactly(value) -> None:
    assert decode(json.loads(json.dumps(encode(value)))) == value


@settings(max_examples=50, deadline=None)
@given(
    data=st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=30),
    dtype=st.sampled_from(["float64", "float32", "int64", "uint32"]),
)
def test_arrays_and_scalars_round_trip_bit_for_bit(data, dtype) -> None:
    arr = np.asarray(data).astype(dtype) if dtype.startswith("float") else np.arange(len(data), dtype=dtype)
    back = decode(json.loads(json.dumps(encode(arr))))
    assert back.dtype == arr.dtype and back.shape == arr.shape and back.tobytes() == arr.tobytes()
    scalar = arr.reshape(-1)[0]
    again = decode(json.loads(json.dumps(encode(scalar))))
    assert type(again) is type(scalar) and again.tobytes() == scalar.tobytes()


def test_the_rng_state_round_trips() -> None:
    state = np.random.RandomState(3).get_state()
    back = decode(json.loads(json.dumps(encode(state))))
    rng = np.random.RandomState()
    rng.set_state(back)
    assert rng.random_sample() == np.random.RandomState(3).random_sample()


@pytest.mark.parametrize("dims, popsize", [(7, 6), (60, 8), (159, 4)])
def test_a_restored_cma_es_continues_exactly(dims: int, popsize: int) -> None:
    opts = {"seed": 2, "popsize": popsize, "verbose": -9, "verb_log": 0, "verb_disp": 0, "bounds": [-3, 1]}

    def step(es: cma.CMAEvolutionStrategy) -> np.ndarray:
        x = es.ask()
        es.tell(x, [float(np.sum(np.square(v - 0.3))) for v in x])
        return np.asarray(x)

    es = cma.CMAEvolutionStrategy(np.zeros(dims), 0.1, opts)
    for _ in range(3):
        step(es)
    saved = json.loads(json.dumps(encode(object_state(es, "cma"))))
    rng = np.random.get_state()
    want = [step(es) for _ in range(3)]
    fresh = cma.CMAEvolutionStrategy(np.zeros(dims), 0.1, opts)
    restore_object(fresh, decode(saved), "cma")
    fresh.timer = cma.utilities.utils.ElapsedWCTime()
    np.random.set_state(rng)
    got = [step(fresh) for _ in range(3)]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(want, got))


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "not JSON, or truncated"),
        (b'{"format": "esc-ao search checkpoint", "version": 1, "state": {"hist', "not JSON, or truncated"),
        (b"\x80\x04\x95garbage\xff\xfe", "not JSON, or truncated"),
        (pickle.dumps({"history": []}), "not JSON, or truncated"),  # an older (pickle) checkpoint
        (b'{"history": []}', "not an esc-ao search checkpoint"),
        (b"[1, 2, 3]", "not an esc-ao search checkpoint"),
        (b'{"format": "esc-ao search checkpoint", "version": 99, "state": {}}', "format version 99"),
        (
            b'{"format": "esc-ao search checkpoint", "version": 1, "state": {"x": {"__reduce__": "os.system"}}}',
            "unknown marker '__reduce__'",
        ),
        (
            b'{"format": "esc-ao search checkpoint", "version": 1, "state": {"x": {"__array__": "|O", "shape": [1], '
            b'"data": [1]}}}',
            "not numeric checkpoint data",
        ),
        (b'{"format": "esc-ao search checkpoint", "version": 1, "state": [1]}', "not a mapping"),
    ],
)
def test_anything_else_is_refused_in_one_line_naming_the_file(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "search.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_restore_never_leaves_the_objects_it_was_given() -> None:
    es = cma.CMAEvolutionStrategy(np.zeros(3), 0.1, {"verbose": -9, "verb_log": 0, "seed": 1})
    for path in ("inputargs.x0", "nothere.x", "__class__", "sm.__dict__"):
        with pytest.raises(CheckpointError, match="does not match"):
            restore_object(es, {path: 1}, "cma")


def test_objects_are_not_data(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="is not checkpoint data"):
        save_checkpoint(tmp_path / "x.ckpt", {"f": object()})
    with pytest.raises(TypeError, match="cannot be checkpointed"):
        encode(np.array([object()]))
    assert not (tmp_path / "x.ckpt").exists()


def test_fortran_order_and_shared_arrays_survive() -> None:
    class Holder:  # stands in for a package's objects: module "cma" is what object_state walks
        pass

    Holder.__module__ = "cma.fake"
    a, b = Holder(), Holder()
    a.inner = b
    a.m = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    b.m = a.m  # one array, two attributes
    state = json.loads(json.dumps(object_state(a, "cma")))
    assert sum(isinstance(v, dict) and "__same_as__" in v for v in state.values()) == 1
    c, d = Holder(), Holder()
    c.inner, c.m, d.m = d, None, None
    restore_object(c, state, "cma")
    assert c.m.flags.f_contiguous and not c.m.flags.c_contiguous and c.inner.m is c.m
    assert c.m.tobytes(order="A") == a.m.tobytes(order="A")
