"""Atomic file output: write to a temporary file beside the target, then rename.

A reader never sees a partial file, and a failure (or a kill) leaves the old file, or
nothing, at the target path.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path"]


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
