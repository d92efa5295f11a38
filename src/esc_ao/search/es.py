"""What every CMA-ES run of the search shares: pycma's options, the penalty for a
non-finite candidate, and which calibration batches a generation scores."""

from __future__ import annotations

from typing import Any

import numpy as np

from esc_ao.config import SearchConfig

__all__ = ["PENALTY", "cma_options", "generation_batches"]

PENALTY = 1e30  # fitness of a candidate whose objective is NaN/Inf: ranked last


def cma_options(config: SearchConfig, budget: int) -> dict[str, Any]:
    """The only place pycma's options are built: seed, popsize, budget, bounds, and no
    files or console output of its own."""
    opts: dict[str, Any] = {
        "seed": config.seed + 1,  # pycma treats seed 0 as "random"
        "bounds": [config.log_bounds[0], config.log_bounds[1]],
        "maxiter": budget,
        "verbose": -9,
        "verb_log": 0,
        "verb_disp": 0,
        "tolfun": 0.0,
        "tolflatfitness": budget + 1,
    }
    if config.popsize is not None:
        opts["popsize"] = config.popsize
    return opts


def generation_batches(n: int, config: SearchConfig, key: tuple[int, ...]) -> list[int]:
    """Indices of the batches (of ``n``) that one generation scores: all of them, or with
    ``config.subsample`` a subset drawn from (seed, key), the same for every candidate of
    the generation so that CMA-ES ranks them on equal terms."""
    if config.subsample is None or config.subsample >= n:
        return list(range(n))
    rng = np.random.default_rng([config.seed, *key])
    return sorted(int(i) for i in rng.choice(n, size=config.subsample, replace=False))
