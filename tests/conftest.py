"""Shared fixtures: small seeded speech models and helpers to inspect converted graphs."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep torch from oversubscribing when pytest runs alongside other work.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def seeded() -> None:
    torch.manual_seed(0)
