"""Hadamard rotation of pre-LayerNorm residual streams (QuaRot style), folded into weights.

A pre-LN transformer's residual stream carries a few channels far larger than the rest
(Whisper tiny.en's last block: 633 against a 99.9th percentile of 37), and every tensor
the stream feeds (the residual adds, the LayerNorm inputs) shares one per-tensor scale
with them. An orthogonal Q spreads such a channel over all channels: x Q has the same
norm and no outlier. The whole stream can be held rotated, exactly, when

* every value of the stream is read only by LayerNorms and by the next residual add;
* Q is orthogonal and maps the all-ones vector to itself (Q 1 = 1). Then the mean and
  the variance LayerNorm takes are the same for x Q as for x, so
  ``layer_norm(x Q) = layer_norm(x) Q`` without affine, and the affine (gamma, beta) is
  folded into the LayerNorm's readers: ``W' = W diag(gamma) Q``, ``b' = b + W beta``;
* what writes into the stream is rotated: a linear branch (optionally times a scalar) by
  ``W' = Q^T W``, ``b' = b Q``; the stream's entry (e.g. conv features + positions), and
  a branch that is not a linear, by an online linear with weight Q^T.

A LayerNorm whose readers are not all unshared linears (the final one feeding a graph
output, or a tied output projection) gets an online linear back to the unrotated basis,
with its affine: ``weight diag(gamma) Q, bias beta``. Online linears cost one d x d
multiply per token each and are named in the records.

Q is a normalised Hadamard matrix (Sylvester, times a Paley order 12 or 20 factor where
d needs it; a seeded random orthogonal matrix otherwise) with seeded random signs, then
reflected so that Q 1 = 1. A Householder reflection changes one direction only, so Q
spreads a single channel as the Hadamard matrix does.

With ``mlp_block`` also an online block-diagonal Hadamard rotation of the input of every
linear that reads an activation function (the MLP's second linear, where GELU's
outliers sit): the input is viewed as blocks of ``mlp_block`` channels, each multiplied
by a Hadamard matrix (an int8-exact +-1/sqrt(b) weight), and the linear's weight columns
by the same rotation, so its output is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch._guards import detect_fake_mode
from torch.fx import GraphModule, Node

from esc_ao.graph_prep import (
    arg_node,
    drop_noop_casts,
    emit_like,
    replace_parameter,
    resolve_attr,
    shared_weight,
    tidy,
)
from esc_ao.transforms.records import TransformRecord

__all__ = ["ROTATION_KEY", "hadamard", "rotate", "rotation"]

aten = torch.ops.aten
# node.meta key on the online linears this transform inserts: "dense" (a d x d rotation,
# kept at 8-bit weights under a 4-bit config by esc_ao.recipe: 4 bits would round it) or
# "block" (+-1/sqrt(b) entries only, exact on any grid).
ROTATION_KEY = "esc_ao_rotation"
_ACTIVATIONS = {aten.gelu.default, aten.silu.default, aten.relu.default, aten.hardswish.default}
_SCALAR_MUL = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}


def _paley(q: int) -> torch.Tensor:
    """Paley's construction I: a Hadamard matrix of order q + 1 for a prime q = 3 mod 4."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if i in residues else -1 for i in range(1, q)]
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    for i in range(q):
        for j in range(q):
            s[i + 1, j + 1] = chi[(j - i) % q]
    return s + torch.eye(q + 1, dtype=torch.float64)


def hadamard(n: int) -> torch.Tensor | None:
    """An n x n matrix of +-1 with orthogonal rows (H H^T = n I), or None when n is not a
    product of powers of 2, 12 and 20 (Sylvester's doubling, Paley's orders 12 and 20)."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    for order, build in (
        (2, lambda: torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)),
        (12, lambda: _paley(11)),
        (20, lambda: _paley(19)),
    ):
        if n % order == 0:
            rest = hadamard(n // order)
            if rest is not None:
                return torch.kron(build(), rest)
    return None


def rotation(n: int, seed: int = 0) -> torch.Tensor:
    """An n x n orthogonal matrix (float64) with Q 1 = 1: a Hadamard matrix with random
    signs on its columns, reflected so that it maps the all-ones vector to itself."""
    gen = torch.Generator().manual_seed(seed)
    h = hadamard(n)
    if h is None:
        r, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    else:
        r = h / math.sqrt(n)
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    r = r * signs  # column signs: still orthogonal
    ones = torch.full((n,), 1.0 / math.sqrt(n), dtype=torch.float64)
    v = r @ ones
    u = v - ones
    if float(u.norm()) < 1e-12:
        return r
    u = u / u.norm()
    return r - 2.0 * torch.outer(u, u @ r)  # (I - 2 u u^T) r: maps r 1 = v back onto 1


@dataclass
class _Stream:
    entries: list[Node] = field(default_factory=list)  # stream values no residual add produces
    adds: dict[Node, Node] = field(default_factory=dict)  # residual add -> its branch operand
    norms: list[Node] = field(default_factory=list)
    values: list[Node] = field(default_factory=list)


def rotate(gm: GraphModule, seed: int = 0, mlp_block: int | None = None) -> list[TransformRecord]:
    """Rotates every pre-LayerNorm residual stream of ``gm`` in place (see the module
    docstring); with ``mlp_block`` (a power of two) also the inputs of linears that read
    an activation function. Returns one record per stream (applied, or why not) and per
    online rotation inserted."""
    if mlp_block is not None and (mlp_block < 2 or mlp_block & (mlp_block - 1)):
        raise ValueError(
            f"mlp_block={mlp_block!r} must be a power of two >= 2 (e.g. 64), or None for no online " "MLP rotation"
        )
    drop_noop_casts(gm)
    records: list[TransformRecord] = []
    cache: dict[int, torch.Tensor] = {}

    def q_of(d: int) -> torch.Tensor:
        if d not in cache:
            cache[d] = rotation(d, seed)
        return cache[d]

    for stream in _streams(gm):
        if not stream.adds:  # a lone LayerNorm: rotating it would only add online work
            continue
        reason = _check(gm, stream)
        online = _online_count(gm, stream)
        if not reason and online > len(stream.adds):
            reason = (
                f"would need {online} online d x d rotations for {len(stream.adds)} residual add(s) (the "
                "stream is cut by LayerNorms or non-linear branches)"
            )
        where = stream.norms[0].name
        if reason:
            records.append(TransformRecord(where, "rotate", False, reason))
            continue
        d = int(stream.norms[0].meta["val"].shape[-1])
        records += _apply(gm, stream, q_of(d))
    if mlp_block is not None:
        records += _rotate_mlp_inputs(gm, mlp_block)
    tidy(gm)
    return records


def _is_norm(node: Node) -> bool:
    return node.op == "call_function" and node.target == aten.layer_norm.default


def _streams(gm: GraphModule) -> list[_Stream]:
    """The graph's residual streams: the LayerNorms' inputs, joined through the residual
    adds between them (x_{i+1} = x_i + branch_i, both x read by a LayerNorm)."""
    values = {n.args[0] for n in gm.graph.nodes if _is_norm(n) and isinstance(n.args[0], Node)}
    parent: dict[Node, Node] = {v: v for v in values}

    def find(v: Node) -> Node:
        while parent[v] is not v:
            v = parent[v]
        return v

    branch: dict[Node, Node] = {}
    for v in values:
        if v.op == "call_function" and v.target == aten.add.Tensor and len(v.args) == 2:
            a, b = v.args
            inside = [x for x in (a, b) if isinstance(x, Node) and x in values]
            if len(inside) == 1:
                other = b if inside[0] is a else a
                if isinstance(other, Node):
                    branch[v] = other
                    parent[find(v)] = find(inside[0])
    streams: dict[Node, _Stream] = {}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for v in sorted(values, key=order.__getitem__):
        s = streams.setdefault(find(v), _Stream())
        s.values.append(v)
        if v in branch:
            s.adds[v] = branch[v]
        else:
            s.entries.append(v)
        s.norms += [u for u in v.users if _is_norm(u)]
    return list(streams.values())


def _check(gm: GraphModule, stream: _Stream) -> str:
    """Why the stream cannot be rotated exactly, or ''."""
    d = stream.values[0].meta["val"].shape[-1]
    for norm in stream.norms:
        shape = list(norm.args[1]) if isinstance(norm.args[1], (list, tuple)) else norm.args[1]
        if shape != [d]:
            return f"{norm.name} normalises over {shape}, not the last dimension alone ({d})"
        for arg in norm.args[2:4]:
            if arg is not None and not (isinstance(arg, Node) and arg.op == "get_attr"):
                return f"{norm.name}'s affine is not a parameter of the graph"
            if isinstance(arg, Node) and len(arg.users) > 1:
                return f"{norm.name}'s affine is shared with another op"
    adds = set(stream.adds)
    for v in stream.values:
        if int(v.meta["val"].shape[-1]) != d:
            return f"{v.name} has {v.meta['val'].shape[-1]} channels, the stream {d}"
        for u in v.users:
            if not (_is_norm(u) and u.args[0] is v) and not (u in adds and stream.adds[u] is not v):
                return f"{v.name} is read by {u.name} ({u.target}), not only by LayerNorms and the next residual add"
    return ""


def _new_param(gm: GraphModule, stem: str, value: torch.Tensor) -> str:
    name, i = f"_esc_rot_{stem}", 0
    while hasattr(gm, f"{name}_{i}"):
        i += 1
    gm.register_parameter(f"{name}_{i}", torch.nn.Parameter(value.float().contiguous(), requires_grad=False))
    return f"{name}_{i}"


def _emit(gm: GraphModule, like: Node, target: Callable[..., Any], *args: Any) -> Node:
    return emit_like(gm, like, target, *args, fake_mode=_fake_mode(gm))


def _fake_mode(gm: GraphModule) -> Any:
    return detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"])


def _get_attr(gm: GraphModule, target: str) -> Node:
    node = gm.graph.get_attr(target)
    fake_mode = _fake_mode(gm)
    value = resolve_attr(gm, target)
    node.meta["val"] = fake_mode.from_tensor(value) if fake_mode is not None else value
    return node


def _online_linear(
    gm: GraphModule,
    after: Node,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stem: str,
    readers: list[Node] | None = None,
) -> Node:
    """Inserts linear(after, weight, bias) right after ``after`` and moves ``readers``
    (default: all of ``after``'s) onto it; returns the new node."""
    readers = list(after.users) if readers is None else readers
    with gm.graph.inserting_after(after):
        w = _get_attr(gm, _new_param(gm, stem, weight))
    args: list[Any] = [after, w]
    if bias is not None:
        with gm.graph.inserting_after(w):
            b = _get_attr(gm, _new_param(gm, stem + "_bias", bias))
        args.append(b)
    with gm.graph.inserting_after(args[-1]):
        lin = _emit(gm, after, aten.linear.default, *args)
    lin.meta[ROTATION_KEY] = "dense"
    for r in readers:
        r.replace_input_with(after, lin)
    return lin


def _param(gm: GraphModule, node: Node) -> torch.Tensor:
    return resolve_attr(gm, str(node.target)).detach().double()


def _optional(node: Node, index: int) -> Node | None:
    """``node.args[index]`` when present and a node (a bias, a LayerNorm's affine)."""
    arg = node.args[index] if len(node.args) > index else None
    return arg if isinstance(arg, Node) else None


def _set(gm: GraphModule, node: Node, value: torch.Tensor) -> None:
    replace_parameter(gm, str(node.target), value.to(resolve_attr(gm, str(node.target)).dtype))


def _foldable_linear(gm: GraphModule, node: Node) -> bool:
    return (
        node.op == "call_function"
        and node.target == aten.linear.default
        and isinstance(node.args[1], Node)
        and node.args[1].op == "get_attr"
        and not shared_weight(gm, node.args[1])
        and (
            len(node.args) < 3
            or node.args[2] is None
            or (isinstance(node.args[2], Node) and node.args[2].op == "get_attr" and len(node.args[2].users) == 1)
        )
    )


def _writer(gm: GraphModule, branch: Node) -> Node | None:
    """The linear producing a branch (through a multiply or divide by a scalar), when its
    output reaches only the stream, else None."""
    node = branch
    while (
        node.op == "call_function"
        and node.target in _SCALAR_MUL
        and len(node.users) == 1
        and isinstance(node.args[0], Node)
        and not isinstance(node.args[1], Node)
    ):
        node = node.args[0]
    if _foldable_linear(gm, node) and len(node.users) == 1:
        return node
    return None


def _online_count(gm: GraphModule, stream: _Stream) -> int:
    """How many online d x d rotations rotating the stream would insert (see _apply)."""
    branches = sum(_writer(gm, b) is None for b in stream.adds.values())
    exits = sum(
        not (n.users and all(_foldable_linear(gm, r) and r.args[0] is n for r in n.users)) for n in stream.norms
    )
    return len(stream.entries) + branches + exits


def _fold_output(gm: GraphModule, lin: Node, q: torch.Tensor) -> None:
    """The linear's output rotated: y Q = x (Q^T W)^T + b Q."""
    weight = arg_node(lin, 1)
    _set(gm, weight, q.T @ _param(gm, weight))
    bias = _optional(lin, 2)
    if bias is not None:
        _set(gm, bias, _param(gm, bias) @ q)


def _apply(gm: GraphModule, stream: _Stream, q: torch.Tensor) -> list[TransformRecord]:
    records: list[TransformRecord] = []
    online = 0
    for entry in stream.entries:
        _online_linear(gm, entry, q.T, None, "entry")
        online += 1
    for add, branch in stream.adds.items():
        lin = _writer(gm, branch)
        if lin is None:
            _online_linear(gm, branch, q.T, None, "branch", readers=[add])
            online += 1
            records.append(TransformRecord(branch.name, "rotate", True, "online rotation of a non-linear branch"))
        else:
            _fold_output(gm, lin, q)
    d = q.shape[0]
    for norm in stream.norms:
        g_node, b_node = _optional(norm, 2), _optional(norm, 3)
        gamma = torch.ones(d, dtype=torch.float64) if g_node is None else _param(gm, g_node)
        beta = torch.zeros(d, dtype=torch.float64) if b_node is None else _param(gm, b_node)
        readers = list(norm.users)
        if readers and all(_foldable_linear(gm, r) and r.args[0] is norm for r in readers):
            for r in readers:
                w_node, r_bias = arg_node(r, 1), _optional(r, 2)
                w = _param(gm, w_node)
                _set(gm, w_node, w * gamma @ q)
                if r_bias is not None:
                    _set(gm, r_bias, _param(gm, r_bias) + w @ beta)
                else:
                    with gm.graph.inserting_after(w_node):
                        b = _get_attr(gm, _new_param(gm, "bias", w @ beta))
                    r.args = (r.args[0], r.args[1], b)
        else:
            _online_linear(gm, norm, gamma[:, None] * q, beta, "exit")
            online += 1
        _unit_affine(gm, norm, d)
    records.insert(
        0,
        TransformRecord(
            stream.norms[0].name,
            "rotate",
            True,
            f"residual stream of {d} channels through {len(stream.norms)} LayerNorm(s) and "
            f"{len(stream.adds)} residual add(s); {online} online d x d rotation(s)",
        ),
    )
    return records


def _unit_affine(gm: GraphModule, norm: Node, d: int) -> None:
    """The LayerNorm's affine becomes (1, 0): it now lives in its readers."""
    args = list(norm.args) + [None] * (5 - len(norm.args))
    for i, value in ((2, torch.ones(d)), (3, torch.zeros(d))):
        current = args[i]
        if isinstance(current, Node):
            _set(gm, current, value.double())
        else:
            with gm.graph.inserting_before(norm):
                args[i] = _get_attr(gm, _new_param(gm, "affine", value))
    norm.args = tuple(args)


def _rotate_mlp_inputs(gm: GraphModule, block: int) -> list[TransformRecord]:
    """Online block-Hadamard rotation of the input of every linear reading an activation."""
    records: list[TransformRecord] = []
    h = hadamard(block)
    assert h is not None  # a power of two
    hb = h / math.sqrt(block)
    for lin in list(gm.graph.nodes):
        if not (
            _foldable_linear(gm, lin)
            and isinstance(lin.args[0], Node)
            and lin.args[0].op == "call_function"
            and lin.args[0].target in _ACTIVATIONS
        ):
            continue
        x = lin.args[0]
        width = int(x.meta["val"].shape[-1])
        if width % block:
            records.append(
                TransformRecord(
                    lin.name, "rotate", False, f"input width {width} is not a multiple of the block {block}"
                )
            )
            continue
        shape = list(x.meta["val"].shape)
        with gm.graph.inserting_after(x):
            blocks = _emit(gm, x, aten.view.default, x, shape[:-1] + [width // block, block])
        with gm.graph.inserting_after(blocks):
            w = _get_attr(gm, _new_param(gm, "block", hb.T))
        with gm.graph.inserting_after(w):
            turned = _emit(gm, x, aten.linear.default, blocks, w)
        turned.meta[ROTATION_KEY] = "block"
        with gm.graph.inserting_after(turned):
            flat = _emit(gm, x, aten.view.default, turned, shape)
        lin.replace_input_with(x, flat)
        # x W^T = (x Hbd)(W Hbd)^T for orthogonal block-diagonal Hbd
        full = torch.block_diag(*[hb] * (width // block))
        weight = arg_node(lin, 1)
        _set(gm, weight, _param(gm, weight) @ full)
        records.append(
            TransformRecord(
                lin.name, "rotate", True, f"online {block}-channel block Hadamard on its " f"{width}-channel input"
            )
        )
    return records
