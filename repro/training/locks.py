"""An exclusive lock on a file (fcntl.flock), for work that processes sharing a folder must not do twice.

Why our own: the few lines of fcntl are all it takes here, and `filelock` would be one more dependency for
the same call. Needs a filesystem whose locks reach every process (NFS with lockd, Lustre mounted with flock).
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created with its folder) while the block runs; others wait."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
