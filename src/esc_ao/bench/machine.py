"""What machine a benchmark figure came from: recorded beside every accuracy cell and
speed row. Speed depends on the CPU's int8 dot-product instructions (XNNPACK's int8 GEMMs
gain 2-3.5x over fp32 with AVX512-VNNI, about 1x without), so they are named."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

__all__ = ["INT8_FEATURES", "cpu_features", "cpu_name", "describe", "describe_cpu"]

# x86: AVX512-VNNI, AVX-VNNI; Arm: dot product (asimddp), int8 matrix multiply (i8mm).
INT8_FEATURES = ("avx512_vnni", "avx_vnni", "asimddp", "i8mm")


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or platform.processor() where there is none."""
    for line in _cpuinfo():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return platform.processor() or "unknown CPU"


def cpu_features() -> list[str]:
    """The int8 dot-product features of INT8_FEATURES that the CPU reports."""
    for line in _cpuinfo():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
            return [f for f in INT8_FEATURES if f in flags]
    return []


def _cpu() -> str:
    """'x86_64 AMD EPYC (avx512_vnni)'."""
    features = ", ".join(cpu_features()) or "no int8 dot-product"
    return f"{platform.machine()} {cpu_name()} ({features})"


def describe_cpu() -> str:
    """'x86_64 AMD EPYC (avx512_vnni), 2 cores': the machine a speed row ran on (each row
    names its own thread count)."""
    return f"{_cpu()}, {os.cpu_count()} cores"


def describe() -> str:
    """'x86_64 AMD EPYC (avx512_vnni), 1 threads, torch 2.14.1+cu130': the machine and
    PyTorch's thread count, beside an accuracy cell."""
    return f"{_cpu()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
