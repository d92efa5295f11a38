"""ESC's local step: each activation scale chosen on its own by minimising the MSE between
the float and the quantized output of the layer(s) that consume the tensor.

One float forward records every intermediate tensor (weights already fake-quantized, every
activation float). Then, per observed tensor x and per candidate scale s, only the nodes
from x to its consuming compute ops are replayed, with x replaced by Q_s(x); the error is
the consumers' output noise-to-signal ratio against the recorded float outputs. Replaying a
few nodes instead of the whole model makes the grid search cost about one forward pass per
tensor-and-candidate of a single layer.

Grid: s = s0 * m, with s0 the observer's own scale (Max, MSE, ... as calibrated) and m on
a geometric grid from 1/32 to 1.5 (plus m = 1 exactly), refined between the best point's
neighbours, so the step can both clip much harder than the tensor's own optimum (what a
layer followed by LayerNorm often wants) and a little less.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.node import map_arg

from esc_ao.annotators import OP_ROLES
from esc_ao.graph_prep import arg_node
from esc_ao.observers import fake_quantize, iter_observers, observer_mode
from esc_ao.pipeline import Batch
from esc_ao.search.objectives import output_tensors
from esc_ao.search.space import ScaleDim

__all__ = ["GRID_RANGE", "local_mse_scales"]

GRID_RANGE = (1.0 / 32.0, 1.5)
_PASSTHROUGH = {t for t, role in OP_ROLES.items() if role == "passthrough"} | {operator.getitem}


def _downstream(start: Node) -> tuple[list[Node], list[Node]]:
    """Nodes to replay from an observer to the compute ops consuming its tensor (through
    views and observers), in graph order, and those compute ops."""
    path: list[Node] = []
    consumers: list[Node] = []
    frontier = list(start.users)
    seen: set[Node] = set()
    while frontier:
        node = frontier.pop()
        if node in seen or node.op == "output" or _returns_nothing(node):
            continue
        seen.add(node)
        path.append(node)
        if node.op == "call_module" or node.target in _PASSTHROUGH:
            frontier.extend(node.users)
        else:
            consumers.append(node)
    order = {n: i for i, n in enumerate(start.graph.nodes)}
    return sorted(path, key=order.__getitem__), consumers


def _returns_nothing(node: Node) -> bool:
    """A node run for its side effect only, such as the ``aten._assert_tensor_metadata``
    that torch.export writes for every ``.to(dtype)`` (67 in Whisper tiny.en's encoder):
    it reads the tensor but has no output whose error could be measured. EscQuantizer's
    graph drops them; a stock quantizer's graph keeps them."""
    return node.op == "call_function" and "val" in node.meta and node.meta["val"] is None


def _run(gm: GraphModule, node: Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if node.op == "call_function":
        return node.target(*args, **kwargs)  # type: ignore[operator]
    if node.op == "call_module":
        return gm.get_submodule(str(node.target))(*args, **kwargs)
    raise NotImplementedError(f"cannot replay {node.op} node {node.name}")


def _layer_error(
    gm: GraphModule, env: dict[Node, Any], site: Node, xq: torch.Tensor, path: list[Node], consumers: list[Node]
) -> float:
    local: dict[Node, Any] = {site: xq}

    def lookup(a: Node) -> Any:
        return local[a] if a in local else env[a]

    for node in path:
        args = map_arg(node.args, lookup)
        kwargs = map_arg(node.kwargs, lookup)
        local[node] = _run(gm, node, args, kwargs)  # type: ignore[arg-type]
    if not consumers:  # the tensor is a model output: its own error
        ref = env[site]
        return float((xq - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))
    # a consumer may return several tensors (split, chunk): every one counts
    pairs = [(q, f) for c in consumers for q, f in zip(output_tensors(local[c]), output_tensors(env[c]))]
    noise = sum(float((q - f).pow(2).sum()) for q, f in pairs if q.is_floating_point())
    signal = sum(float(f.pow(2).sum()) for _, f in pairs if f.is_floating_point())
    return noise / max(signal, 1e-30)


@contextlib.contextmanager
def _replay_mode(prepared: GraphModule, dims: list[ScaleDim]) -> Iterator[None]:
    """Weights quantized, activations float, and no observer recording: the replays pass
    through observers (views of a watched tensor) and must not add the candidates to
    their statistics (they did: a second search then started from other scales)."""
    activation = {id(d.observer) for d in dims}
    with observer_mode(prepared, observing=False, fake_quant=False):
        for _, obs in iter_observers(prepared):
            if id(obs) not in activation:
                obs.fake_quant = True
        yield


@torch.no_grad()
def _record(prepared: GraphModule, batch: Batch) -> dict[Node, Any]:
    """Every intermediate value of one forward (run inside ``_replay_mode``)."""
    interp = Interpreter(prepared, garbage_collect_values=False)
    interp.run(*batch)
    return interp.env


_ROWS = 512  # rows of a linear layer's input the local step evaluates (see _linear_rows)


def _linear_rows(site: Node, env: dict[Node, Any], path: list[Node], consumers: list[Node]) -> Any:
    """Fast path for a tensor read only by one linear: a linear maps each row (token)
    independently, so its output error can be estimated on every k-th row (at most 512)
    instead of all of them: 3x (1500 -> 500 rows for Whisper) less work per candidate."""
    if len(path) != 1 or len(consumers) != 1:
        return None
    lin = consumers[0]
    if lin.target != torch.ops.aten.linear.default or lin.args[0] is not site:
        return None
    x = env[site]
    rows = x.reshape(-1, x.shape[-1])
    step = max(1, rows.shape[0] // _ROWS)
    w = env[arg_node(lin, 1)]
    b = env[arg_node(lin, 2)] if len(lin.args) > 2 and lin.args[2] is not None else None
    ref = env[lin].reshape(-1, w.shape[0])[::step]
    return rows[::step], w, b, ref


@torch.no_grad()
def local_mse_scales(
    prepared: GraphModule,
    dims: list[ScaleDim],
    batches: list[Batch],
    grid: int,
    indices: Sequence[int] | None = None,
) -> list[float]:
    """The local-step scale of every dimension, or of the dimensions at ``indices`` (each
    is fitted on its own, so ranks can share them out); not written into the observers.

    Two-stage grid of ``grid`` points in all: grid/2 multipliers geometric over GRID_RANGE
    (plus 1.0), then grid/2 between the best one's neighbours.
    """
    with _replay_mode(prepared, dims):
        return _fit(prepared, dims, batches, grid, list(range(len(dims))) if indices is None else list(indices))


def _fit(prepared: GraphModule, dims: list[ScaleDim], batches: list[Batch], grid: int, todo: list[int]) -> list[float]:
    plans = {i: [(n, *_downstream(n)) for n in dims[i].nodes] for i in todo}
    base = [d.observer.init_scale for d in dims]
    envs = [_record(prepared, batch) for batch in batches]
    coarse = np.unique(np.append(np.geomspace(*GRID_RANGE, max(2, grid // 2)), 1.0))
    scales = []
    for i in todo:
        dim = dims[i]
        error = _dim_error(prepared, envs, dim, plans[i])
        errs = np.array([error(base[i] * float(m)) for m in coarse])
        b = _argmin_last(errs)
        lo, hi = coarse[max(b - 1, 0)], coarse[min(b + 1, coarse.size - 1)]
        fine = np.geomspace(lo, hi, max(2, grid - grid // 2))
        fine_errs = np.array([error(base[i] * float(m)) for m in fine])
        cand = np.concatenate([coarse, fine])
        all_errs = np.concatenate([errs, fine_errs])
        order = np.argsort(cand, kind="stable")
        best = order[_argmin_last(all_errs[order])]
        scales.append(base[i] * float(cand[best]))
    return scales


def _argmin_last(errs: np.ndarray) -> int:
    # Ties go to the larger multiplier (less clipping): argmin of the reversed array.
    return int(errs.size - 1 - np.argmin(errs[::-1]))


def _dim_error(
    prepared: GraphModule, envs: list[dict[Node, Any]], dim: ScaleDim, plans: list[tuple[Node, list[Node], list[Node]]]
) -> Any:
    """error(scale): the layer-output noise-to-signal ratio, summed over batches and over
    the tensors the observer watches (each quantized at its own call site)."""
    _, zp = dim.observer.qparams()
    qmin, qmax = dim.observer.quant_min, dim.observer.quant_max
    fast = [[_linear_rows(site, env, path, consumers) for site, path, consumers in plans] for env in envs]

    def error(scale: float) -> float:
        total = 0.0
        for env, rows_per_site in zip(envs, fast):
            for (site, path, consumers), rows in zip(plans, rows_per_site):
                if rows is not None:
                    x, w, b, ref = rows
                    out = torch.nn.functional.linear(fake_quantize(x, scale, zp, qmin, qmax), w, b)
                    total += float((out - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))
                else:
                    xq = fake_quantize(env[arg_node(site, 0)], scale, zp, qmin, qmax)
                    total += _layer_error(prepared, env, site, xq, path, consumers)
        return total

    return error
