"""Atomic file output: write to a temporary file beside the target, then rename.

A reader never sees a partial file, and a failure (or a kill) leaves the old file, or
nothing, at the target path. ``staged_dir`` does the same for a set of files: a job's
outputs appear together, or (on a failure) none of them does.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_path", "staged_dir", "write_json_atomic", "write_text_atomic"]


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[str]:
    """Yields a temporary path in ``path``'s directory; on normal exit it replaces ``path``,
    on any exit the temporary file is gone."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        # mkstemp makes the file 0600; outputs get the mode an ordinary open() would give.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def staged_dir(out_dir: Path) -> Iterator[Path]:
    """Yields an empty directory beside ``out_dir`` to write files into; on normal exit
    each file is renamed into ``out_dir`` (created if needed; files already there under
    other names are kept), on any exit the staging directory is gone. A failure part way
    (a lowering error after the program was written) so leaves ``out_dir`` as it was."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.staging-"))
    try:
        yield stage
        out_dir.mkdir(exist_ok=True)
        umask = os.umask(0)
        os.umask(umask)
        for item in sorted(stage.iterdir()):
            target = out_dir / item.name
            if item.is_dir():
                # a folder of outputs (an NPU program's delegates) replaces the previous one whole
                os.chmod(item, 0o777 & ~umask)
                if target.is_dir():
                    shutil.rmtree(target)
            else:
                os.chmod(item, 0o666 & ~umask)
            os.replace(item, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Writes via a temporary file in the same directory and an atomic rename."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json_atomic(path: Path, data: Any) -> None:
    def default(o: Any) -> Any:
        if hasattr(o, "__dataclass_fields__"):
            return asdict(o)
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    write_text_atomic(path, json.dumps(data, indent=1, default=default, allow_nan=True) + "\n")
