"""Where OS errors become FerryErrors: a missing file is NotFoundError, a full disk
StorageFullError, the rest StorageError.

Adapters that read and write files call these at the point they meet the
``OSError``, with a ``what`` that says what they were doing ("cannot write
recovery point file /x"), so the message names the file, the operation and
the OS's reason. Callers above the adapters then see only FerryErrors.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ferry.errors import FerryError, NotFoundError, StorageError, StorageFullError

FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left, disk quota exceeded


def free_mib(path: str | Path) -> int | None:
    """MiB free on the file system holding ``path`` (or its nearest existing parent)."""
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        return shutil.disk_usage(where).free // 2**20
    except OSError:
        return None


def is_full(exc: OSError) -> bool:
    return exc.errno in FULL


def os_error(what: str, exc: OSError) -> FerryError:
    """The FerryError for ``exc``, met while doing ``what``; raise it ``from exc``."""
    if isinstance(exc, FileNotFoundError):
        return NotFoundError(f"{what}: {exc.filename or exc.strerror} does not exist")
    path = "" if exc.filename is None else str(exc.filename)
    if is_full(exc):
        free = free_mib(path) if path else None
        left = "" if free is None else f" ({free} MiB free)"
        return StorageFullError(f"{what}: {exc.strerror or exc}{left}", path=path)
    return StorageError(f"{what}: {exc.strerror or exc}", path=path)


@contextmanager
def os_errors(what: str) -> Iterator[None]:
    """Translate the OS errors of the ``with`` body (see :func:`os_error`)."""
    try:
        yield
    except OSError as exc:
        raise os_error(what, exc) from exc
