"""esc_ao.atomic: outputs appear whole or not at all, with ordinary file permissions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from esc_ao.atomic import atomic_path


def test_written_file_replaces_target_with_umask_permissions(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        Path(tmp).write_bytes(b"new")
        assert target.read_bytes() == b"old"  # readers see the old file until the rename
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_bytes() == b"new" and (target.stat().st_mode & 0o777) == (0o666 & ~umask)
    assert list(tmp_path.iterdir()) == [target]


def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            Path(tmp).write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]
