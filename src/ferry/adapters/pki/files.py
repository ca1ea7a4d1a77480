"""Certificate files on disk: the directory layouts and all-or-nothing writes.

Directory layouts (QEMU's ``tls-creds-x509`` reads a host dir as it is)::

    CA dir     ca-cert.pem  ca-key.pem (0600)
    host dir   ca-cert.pem  server-cert.pem  server-key.pem (0600)
                            client-cert.pem  client-key.pem (0600)
    admin dir  ca-cert.pem  client-cert.pem  client-key.pem (0600)

A host dir serves as-is for both ``endpoint=server`` and ``endpoint=client``:
the host certificate carries both key purposes, so the client pair is a copy
of the server pair. OS errors become :class:`PkiError` here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from cryptography import x509

from ferry.errors import PkiError

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"


def write_files(directory: Path, files: Mapping[str, tuple[bytes, bool]]) -> None:
    """Write ``{name: (data, private)}`` into ``directory``, all or nothing.

    Every file goes to a temporary name first and is renamed into place only
    when all are written, so a failure never leaves a new key next to an old
    certificate. Private files are created 0600 from the start.
    """
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise PkiError(f"cannot create {directory}: {exc.strerror}") from exc
    staged: list[tuple[Path, Path]] = []
    try:
        for name, (data, private) in files.items():
            final = directory / name
            tmp = directory / f".{name}.tmp"
            mode = 0o600 if private else 0o644
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            staged.append((tmp, final))
            with os.fdopen(fd, "wb") as fh:
                # The umask could only narrow the mode; make it exact anyway.
                os.fchmod(fh.fileno(), mode)
                fh.write(data)
        for tmp, final in staged:
            tmp.replace(final)
    except OSError as exc:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        where = exc.filename or directory
        raise PkiError(
            f"cannot write certificate files in {directory}: {where}: {exc.strerror}"
        ) from exc


def read_file(path: Path, remedy: str) -> bytes:
    """The bytes of a certificate or key file; ``remedy`` says what to do if it cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise PkiError(f"{path} does not exist; {remedy}") from exc
    except OSError as exc:
        raise PkiError(f"cannot read {path}: {exc.strerror}; {remedy}") from exc


def load_pem_cert(path: Path, remedy: str) -> x509.Certificate:
    data = read_file(path, remedy)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise PkiError(f"{path} is not a PEM certificate ({exc}); {remedy}") from exc


def require_file(path: Path, remedy: str) -> str:
    """``path`` as a string for APIs that open it themselves, once it is known to exist."""
    if not path.is_file():
        raise PkiError(f"{path} does not exist; {remedy}")
    return str(path)
