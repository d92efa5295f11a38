"""Fitness evaluation sharded over torch.distributed ranks.

Under ``torchrun --nproc-per-node N``, every rank runs the same ``esc_ao.calibrate`` call on
the same data. The calibration batches are sharded (rank r takes batches r, r + N, ...);
every rank evaluates each candidate on its shard; the objective's (numerator, denominator)
parts are all-reduced, so every rank sees the objective of the whole set; rank 0 drives
CMA-ES and broadcasts the candidates. gloo on CPU, nccl on GPU.

A rank that dies makes the collectives of the others fail: gloo reports a closed connection
at once, and every collective is bounded by the process group's timeout, so the survivors
raise ``DistributedError`` instead of hanging.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

__all__ = ["Cluster", "DistributedError", "cluster_from_env"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class DistributedError(RuntimeError):
    """Another rank failed or stopped answering."""


@dataclass(frozen=True)
class Cluster:
    """This process's place among the ranks (a single process is rank 0 of 1)."""

    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def shard(self, batches: Sequence[T]) -> list[T]:
        """This rank's batches (round robin)."""
        mine = list(batches[self.rank :: self.world])
        if not mine:
            raise ValueError(
                f"{len(batches)} calibration batches cannot be shared by {self.world} ranks: "
                "give at least one batch per rank"
            )
        return mine

    def sum_parts(self, numerator: float, denominator: float) -> tuple[float, float]:
        """All-reduced (sum over ranks) objective parts."""
        if not self.enabled:
            return numerator, denominator
        # nccl reduces device tensors only
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([numerator, denominator], dtype=torch.float64, device=device)
        self._guard(dist.all_reduce, t)
        return float(t[0]), float(t[1])

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_driver else None]
        self._guard(dist.broadcast_object_list, box, src=0)
        return box[0]

    def merge(self, part: dict[int, Any]) -> dict[int, Any]:
        """The union of every rank's ``part`` (keys disjoint across ranks), on every rank."""
        if not self.enabled:
            return dict(part)
        parts: list[Any] = [None] * self.world
        self._guard(dist.all_gather_object, parts, part)
        return {k: v for p in parts for k, v in p.items()}

    def _guard(self, op: Any, *args: Any, **kwargs: Any) -> None:
        try:
            op(*args, **kwargs)
        except Exception as exc:  # gloo/nccl raise RuntimeError or DistBackendError
            raise DistributedError(
                f"rank {self.rank}/{self.world}: a collective failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); another rank probably died or timed out"
            ) from exc


def cluster_from_env(timeout_s: float) -> Cluster:
    """The cluster torchrun set up (initialising the process group if needed), or a
    single-process cluster."""
    if dist.is_available() and dist.is_initialized():
        return Cluster(dist.get_rank(), dist.get_world_size())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Cluster()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # one GPU per rank: nccl's object collectives use the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    cluster = Cluster(dist.get_rank(), dist.get_world_size())
    log.info("esc_ao: rank %d of %d (%s)", cluster.rank, cluster.world, backend)
    return cluster
