"""Making files and renames survive a crash: fsync of files and of directories.

OS errors become FerryErrors here (:mod:`ferry.adapters.os_errors`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ferry.adapters.os_errors import os_errors


def fsync_file(path: Path) -> None:
    with os_errors(f"cannot make {path} durable"), path.open("rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make the names in ``path`` (a rename, a new file) durable."""
    with os_errors(f"cannot make the names in {path} durable"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
