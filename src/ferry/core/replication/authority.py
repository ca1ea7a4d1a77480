"""Who may act on a replication relationship through the peer protocol (pure rules).

Theory of operation: a host certificate of the ferry CA only proves that the
caller is *a* ferry host. Every replication call is about one VM, and for
each the receiving host knows exactly one partner it takes orders from:

* on a replica host, the relationship's **primary**, recorded by name and
  pinned by certificate thumbprint when the VM was offered (and re-pinned
  when a handover or a replica move names a new primary). Point uploads,
  changes, removal, point lists, block hashes, file uploads and replica
  moves are accepted only from that host;
* on the host a VM has just moved to, the **source of that move**: the
  takeover of the relationship (the old primary hands it over) is accepted
  only from the host named as source by this host's last finished incoming
  move of the VM (and by its certificate thumbprint, where the move
  recorded one).

An admin certificate may call every endpoint (it may do anything on the host
anyway). A refusal is an :class:`~ferry.errors.AuthError` (403) raised before
anything changes. The functions take plain values, so the table of who may
call what is tested without certificates or a catalog.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ferry.errors import AuthError


@dataclass(frozen=True)
class Caller:
    """The verified certificate of a peer call, as the rules need it."""

    name: str  # the certificate's common name: the host's name
    thumbprint: str  # SHA-256 of the certificate, lowercase hex
    admin: bool = False


@dataclass(frozen=True)
class ArrivedMove:
    """A live move this host received and finished (the VM runs here since)."""

    vm_uuid: str
    source: str  # the host the VM came from
    finished: float  # Unix time the move ended
    thumbprint: str = ""  # the source's certificate, if the move recorded it


def check_partner(caller: Caller, *, vm: str, partner: str, thumbprint: str,
                  role: str = "primary") -> None:  # fmt: skip
    """Only the pinned partner (by name, and by thumbprint where one is pinned) may act."""
    if caller.admin:
        return
    if caller.name == partner and (not thumbprint or caller.thumbprint == thumbprint):
        return
    pinned = f" with certificate thumbprint {thumbprint[:16]}..." if thumbprint else ""
    raise AuthError(f"host {caller.name!r} is not the {role} of VM {vm!r} (that is "
                    f"{partner!r}{pinned}); refused")  # fmt: skip


def check_takeover(caller: Caller, *, vm_uuid: str, vm: str, here: str,
                   arrived: Iterable[ArrivedMove]) -> None:  # fmt: skip
    """Only the host VM ``vm`` has just moved here from may hand its replication over."""
    if caller.admin:
        return
    moves = sorted((m for m in arrived if m.vm_uuid == vm_uuid), key=lambda m: m.finished)
    if not moves:
        raise AuthError(f"host {caller.name!r} may not hand replication of VM {vm!r} over to "
                        f"{here!r}: no move of that VM arrived here")  # fmt: skip
    source = moves[-1].source
    if source != caller.name:
        raise AuthError(f"host {caller.name!r} may not hand replication of VM {vm!r} over to "
                        f"{here!r}: the VM last arrived here from {source!r}")  # fmt: skip
    pinned = moves[-1].thumbprint
    if pinned and caller.thumbprint != pinned:
        raise AuthError(f"host {caller.name!r} may not hand replication of VM {vm!r} over to "
                        f"{here!r}: its certificate is not the one the move came with "
                        f"({pinned[:16]}...)")  # fmt: skip
