"""This agent's copy of the deny-list: revoked certificates are refused at once.

``ferry pki revoke`` pushes the CA dir's list to every agent
(``POST /v1/revocations``, admin only); the agent merges it into
``<data dir>/revoked.json`` (so it survives restarts) and closes every open
connection whose client presented a newly revoked certificate, so a
keep-alive connection opened before cannot go on. From then on the edge
refuses a request from a revoked certificate with 403 and closes its
connection (:meth:`Revocations.check`, on every request), and this agent's
own peer calls refuse an agent that presents one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from ferry.adapters.pki import CertInfo, cert_info_from_der
from ferry.adapters.pki.revocation import REVOKED_FILE, RevocationList, Revoked
from ferry.errors import AuthError, FerryError

log = logging.getLogger(__name__)


class Revocations:
    """The revoked serials and the open connections they must not keep."""

    def __init__(self, data_dir: Path) -> None:
        self.list = RevocationList(data_dir / REVOKED_FILE)
        self._connections: Callable[[], Iterable[asyncio.BaseTransport | None]] = list

    def attach(self, connections: Callable[[], Iterable[asyncio.BaseTransport | None]]) -> None:
        """How to list the server's open connections, which a revocation may cut."""
        self._connections = connections

    def check(self, cert: CertInfo, *, what: str = "certificate") -> None:
        entry = self.list.get(cert.serial) if cert.serial else None
        if entry is not None:
            host = f" of host {entry.host!r}" if entry.host else ""
            raise AuthError(
                f"{what} {cert.common_name!r} (serial {cert.serial}){host} is revoked; "
                "issue a new one with 'ferry pki renew' or 'ferry pki host'"
            )

    def merge(self, entries: list[Revoked]) -> list[Revoked]:
        """Add ``entries``; cut the open connections of the certificates just revoked."""
        added = self.list.merge(entries)
        if added:
            log.warning("revoked %s", ", ".join(f"{e.serial} ({e.host or '?'})" for e in added))
            self._cut({e.serial for e in added})
        return added

    def _cut(self, serials: set[str]) -> None:
        for transport in self._connections():
            ssl_object = transport.get_extra_info("ssl_object") if transport else None
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            if not der or transport is None:
                continue
            try:
                serial = cert_info_from_der(der).serial
            except FerryError:
                continue
            if serial in serials:
                log.warning("closing a connection from revoked certificate %s", serial)
                transport.close()
