"""A seeded stand-in for a benchmark task, shared by the benchmark tests."""

from __future__ import annotations

import torch
from torch import nn

from esc_ao.bench.tasks import Task, single_part
from esc_ao.metrics import accuracy
from esc_ao.search.objectives import CrossEntropy


def stand_in_task(n_calibration: int, seed: int) -> Task:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(64, 16)
    with torch.no_grad():
        y = model(x).argmax(-1)  # labels the float model gets right: accuracy 1.0 in float
    batches = [(xb,) for xb in torch.split(x[:n_calibration], 8)]
    labels = list(torch.split(y[:n_calibration], 8))

    def evaluate(forward):
        pred = torch.cat([forward(xb).argmax(-1) for xb in torch.split(x, 8)])  # static batch of 8
        return accuracy((pred == y).tolist())

    return single_part(
        "ast",
        "accuracy",
        model,
        batches,
        lambda idx: CrossEntropy([labels[i] for i in idx]),
        evaluate,
        {"stand_in": True},
    )
