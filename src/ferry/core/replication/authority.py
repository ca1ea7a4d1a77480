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
  recorded one);
* on a replica host, for a **clustered** VM, also the hosts of the primary's
  cluster (:class:`ClusterHost`: name and thumbprint, told by the primary):
  any of them may make *itself* the primary (a ``PATCH`` naming itself with
  its own certificate), and nothing else. The replica cannot read the
  primary cluster's store; the cluster decides who owns the VM (its
  ownership record, won by compare-and-swap), and only the owner claims.
  A relationship with no cluster hosts keeps the rule above unchanged.

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
    dns_names: tuple[str, ...] = ()  # its subject alternative names (a cluster's, below)


def cluster_san(cluster: str) -> str:
    """The DNS name every node certificate of a replica cluster carries (the CA issues it
    to its nodes only: ``replica-server enable --cluster``), and what a primary pins."""
    return f"{cluster}.cluster.ferry"


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


@dataclass(frozen=True)
class ClusterHost:
    """A host of the primary's cluster, as the replica knows it."""

    name: str
    thumbprint: str  # SHA-256 of its host certificate, lowercase hex


def _member(caller: Caller, hosts: Iterable[ClusterHost], cluster: str) -> bool:
    """A host of the cluster: by the name and certificate the cluster told, or by a
    certificate that names the cluster (its thumbprint may be newer than what was told:
    a node's certificate renewed after the hosts were told)."""
    if cluster and cluster_san(cluster) in caller.dns_names:
        return True
    return any(h.name == caller.name and h.thumbprint == caller.thumbprint for h in hosts)


def check_primary_or_cluster(caller: Caller, *, vm: str, partner: str, thumbprint: str,
                             cluster: str, hosts: Iterable[ClusterHost]) -> None:  # fmt: skip
    """The pinned primary, or (for a clustered VM) a host of its cluster, may ask for a change.

    What a cluster host may change is :func:`check_primary_change`'s to say.
    """
    hosts = tuple(hosts)
    if hosts and _member(caller, hosts, cluster):
        return
    try:
        check_partner(caller, vm=vm, partner=partner, thumbprint=thumbprint)
    except AuthError as exc:
        if not hosts:
            raise
        raise AuthError(f"{exc} (nor a host of its cluster {cluster!r})") from None


def check_primary_change(caller: Caller, *, vm: str, partner: str, thumbprint: str,
                         cluster: str, hosts: Iterable[ClusterHost],
                         new_primary: str | None, new_thumbprint: str | None) -> bool:  # fmt: skip
    """May ``caller`` make these changes to the replica of ``vm``? True: a cluster host's claim.

    The pinned primary may change anything (the rule of :func:`check_partner`).
    Another host of the primary's cluster may only take the primary's place
    itself: ``new_primary`` its own name and ``new_thumbprint`` its own
    certificate; the rest of the same request then applies as the primary's.
    """
    hosts = tuple(hosts)
    if caller.admin or (
        caller.name == partner and (not thumbprint or caller.thumbprint == thumbprint)
    ):
        return False  # fmt: skip
    check_primary_or_cluster(caller, vm=vm, partner=partner, thumbprint=thumbprint,
                             cluster=cluster, hosts=hosts)  # fmt: skip
    if new_primary is None or new_thumbprint is None:
        raise AuthError(f"host {caller.name!r} is not the primary of VM {vm!r} (that is "
                        f"{partner!r}); a host of its cluster {cluster!r} may only make itself "
                        "the primary; refused")  # fmt: skip
    if new_primary != caller.name or new_thumbprint != caller.thumbprint:
        raise AuthError(f"host {caller.name!r} of cluster {cluster!r} may make only itself the "
                        f"primary of VM {vm!r}, not {new_primary!r} with certificate "
                        f"{new_thumbprint[:16]}...; refused")  # fmt: skip
    return True


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
