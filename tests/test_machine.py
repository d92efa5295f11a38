"""The machine description recorded beside every benchmark figure names the CPU and its
int8 dot-product features (speed conclusions depend on them)."""

from __future__ import annotations

from esc_ao.bench import machine


def test_describe_names_cpu_int8_features_and_threads(monkeypatch) -> None:
    monkeypatch.setattr(machine, "_cpuinfo", lambda: ["model name\t: Some CPU 9000", "flags\t\t: sse avx2 avx512_vnni"])
    text = machine.describe()
    assert "Some CPU 9000 (avx512_vnni)" in text and "threads" in text and "torch" in text
    monkeypatch.setattr(machine, "_cpuinfo", lambda: ["Features\t: fp asimd asimddp i8mm"])
    assert machine.cpu_features() == ["asimddp", "i8mm"]
    monkeypatch.setattr(machine, "_cpuinfo", lambda: [])
    assert machine.cpu_features() == [] and "no int8 dot-product" in machine.describe()
