"""A small seeded model and data for the ESC search tests (also run as a subprocess by
the SIGKILL resume test)."""

from __future__ import annotations

import copy
import functools
import sys

import torch
import torchaudio

from esc_ao import EscQuantizer, QuantConfig, SearchConfig, calibrate, export_model, observe, prepare
from esc_ao.speech import ExportableConformer


@functools.cache
def _exported() -> tuple[torch.nn.Module, torch.fx.GraphModule, list[tuple], torch.Tensor]:
    """Exported once per process: the tests that share it each prepare a deep copy."""
    torch.manual_seed(0)
    model = ExportableConformer(
        torchaudio.models.Conformer(input_dim=32, num_heads=2, ffn_dim=64, num_layers=1, depthwise_conv_kernel_size=7)
    ).eval()
    batches = [(torch.randn(2, 40, 32), torch.tensor([40, 40])) for _ in range(3)]
    rng = torch.get_rng_state()  # what a test drawing after small_setup saw before the cache
    return model, export_model(model, batches[0]), batches, rng


def small_setup(method: str = "esc", bits: int = 4) -> tuple[torch.nn.Module, torch.fx.GraphModule, list[tuple]]:
    model, exported, batches, rng = _exported()
    torch.set_rng_state(rng)
    prepared = prepare(
        copy.deepcopy(exported), EscQuantizer(QuantConfig(weight_bits=bits, act_bits=bits, method=method))
    )
    observe(prepared, batches)
    return model, prepared, batches


def run_search(checkpoint: str | None, budget: int, seed: int = 0, objective=None, stages: int = 1) -> list[float]:
    _, prepared, batches = small_setup()
    config = SearchConfig(
        budget=budget,
        popsize=6,
        seed=seed,
        progress=False,
        local_grid=8,
        dist_timeout_s=30,
        stages=stages,
        stage_budget=2,
    )
    return calibrate(prepared, batches, objective=objective, config=config, checkpoint=checkpoint).final_scales


def _dying_objective(after: int):  # type: ignore[no-untyped-def]
    """OutputMSE that kills this process (as a crash would) after `after` evaluations."""
    import os

    from esc_ao.search.objectives import OutputMSE

    calls = {"n": 0}
    base = OutputMSE()

    def objective(outputs, refs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > after:
            os._exit(3)
        return base(outputs, refs)

    return objective


if __name__ == "__main__":  # python _esc_helpers.py CHECKPOINT BUDGET OUT [die-after-N-evaluations]
    import os

    torch.set_num_threads(1)
    ckpt = None if sys.argv[1] == "-" else sys.argv[1]
    objective = _dying_objective(int(sys.argv[4])) if len(sys.argv) > 4 else None
    # ESC_TEST_STAGES: the staged search (default 1: flat)
    scales = run_search(ckpt, int(sys.argv[2]), objective=objective, stages=int(os.environ.get("ESC_TEST_STAGES", "1")))
    if os.environ.get("RANK", "0") == "0":
        torch.save(scales, sys.argv[3])
