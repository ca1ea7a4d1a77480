"""Where OS errors become FerryErrors: a missing file is NotFoundError, the rest StorageError.

Adapters that read and write files call these at the point they meet the
``OSError``, with a ``what`` that says what they were doing ("cannot write
recovery point file /x"), so the message names the file, the operation and
the OS's reason. Callers above the adapters then see only FerryErrors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ferry.errors import FerryError, NotFoundError, StorageError


def os_error(what: str, exc: OSError) -> FerryError:
    """The FerryError for ``exc``, met while doing ``what``; raise it ``from exc``."""
    if isinstance(exc, FileNotFoundError):
        return NotFoundError(f"{what}: {exc.filename or exc.strerror} does not exist")
    path = "" if exc.filename is None else str(exc.filename)
    return StorageError(f"{what}: {exc.strerror or exc}", path=path)


@contextmanager
def os_errors(what: str) -> Iterator[None]:
    """Translate the OS errors of the ``with`` body (see :func:`os_error`)."""
    try:
        yield
    except OSError as exc:
        raise os_error(what, exc) from exc
