"""The split-brain guard: before a failover, ask whether the VM still runs elsewhere.

Both ends live here. The replica host asks its primary
(``GET /v1/peer/vms/{uuid}``, pinned to the primary's certificate); an
extended replica also asks about the VM's origin, through the replica host it
is extended from (``?ask=primary``: that host asks its own primary, which
knows it as its replica) and, if that host is lost, the origin directly. The
answering host tells only a partner of that VM (:func:`partners`).

A host that cannot be reached, or does not know the VM, does not run it. A
host that answers but refuses to say might run it, so that refuses the
failover too (``--force`` overrides both, for a host that is really lost).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from ferry.adapters.pki import CertInfo
from ferry.adapters.pki import Role as CertRole
from ferry.core.relationship import Extension, Relationship, Role
from ferry.core.replication import Caller, check_partner
from ferry.core.replication.authority import cluster_san
from ferry.core.replication.broker import PREFIX as BROKER_PREFIX
from ferry.errors import AuthError, ConflictError, ConnectionFailedError, NotFoundError
from ferry.host.failover.steps import FailoverSteps
from ferry.peer import failover as wire
from ferry.peer.client import Timeout
from ferry.peer.routes import NoBody
from ferry.peer.server import Call

log = logging.getLogger(__name__)

# VM states in which a host's copy counts as running (or about to).
RUNNING = frozenset({"running", "paused", "starting", "migrating"})


def caller_of(cert: CertInfo) -> Caller:
    return Caller(name=cert.common_name, thumbprint=cert.thumbprint,
                  admin=cert.role is CertRole.ADMIN)  # fmt: skip


def partners(rel: Relationship, extension: Extension | None) -> list[tuple[str, str, str]]:
    """(host, pinned thumbprint or "", role) of every host that may ask about ``rel``'s VM."""
    if rel.role is Role.PRIMARY:
        return [(rel.replica, rel.thumbprint, "replica")]
    found = [(rel.primary, rel.thumbprint, "primary")]
    if rel.origin:
        found.append((rel.origin, "", "origin"))
    if extension is not None:
        found.append((extension.host, extension.thumbprint, "extended replica"))
    return found


def check_any_partner(caller: Caller, *, vm: str,
                      allowed: list[tuple[str, str, str]]) -> None:  # fmt: skip
    """AuthError unless ``caller`` is one of ``allowed`` (by name, and thumbprint if pinned)."""
    for host, thumbprint, role in allowed:
        try:
            check_partner(caller, vm=vm, partner=host, thumbprint=thumbprint, role=role)
            return
        except AuthError:
            continue
    names = ", ".join(f"{role} {host!r}" for host, _, role in allowed)
    raise AuthError(f"host {caller.name!r} is not a partner of VM {vm!r} (those are: "
                    f"{names or 'none'}); refused")  # fmt: skip


class SplitBrainGuard:
    def __init__(self, steps: FailoverSteps) -> None:
        self.steps = steps

    # -- asking (on the replica host) ----------------------------------------------------

    async def check(self, rel: Relationship) -> None:
        """ConflictError if a host says, or might say, that the VM runs there."""
        asks: list[tuple[str, Callable[[], Awaitable[wire.VmState]]]] = []
        if rel.primary_url:
            asks.append(
                (
                    rel.primary,
                    lambda: self._ask(
                        rel.primary, rel.primary_url, rel.vm_uuid, pin=rel.thumbprint
                    ),
                )
            )
        if rel.origin:
            asks.append((rel.origin, lambda: self._ask_origin(rel)))
        for host, ask in asks:
            try:
                reply = await ask()
            except (ConnectionFailedError, NotFoundError):
                continue
            except AuthError as exc:
                raise ConflictError(
                    f"host {host!r} answers but does not say whether VM {rel.vm_name!r} runs "
                    f"there ({exc}); a failover now might run two copies: pass --force if "
                    "that host is really lost"
                ) from exc
            if reply.state in RUNNING:
                raise ConflictError(
                    f"VM {rel.vm_name!r} still runs on host {reply.host or host!r}: a failover "
                    f"now would run two copies; use 'ferry failover planned {rel.vm_name}' from "
                    "there, or stop it there, or pass --force if that host is really lost"
                )

    async def _ask(self, host: str, url: str, vm_uuid: str, *, pin: str | None = None,
                   query: dict[str, str] | None = None) -> wire.VmState:  # fmt: skip
        async with self.steps.peers.connect(host, url, timeout=Timeout.PROBE, pin=pin) as peer:
            return await peer.call(wire.VM_STATE, query=query, uuid=vm_uuid)

    async def _ask_origin(self, rel: Relationship) -> wire.VmState:
        """The origin's answer through the replica host in between, else from the origin."""
        try:
            if not rel.primary_url:
                raise ConnectionFailedError(f"no address known for host {rel.primary!r}")
            return await self._ask(rel.primary, rel.primary_url, rel.vm_uuid, pin=rel.thumbprint,
                                   query=wire.ASK_PRIMARY)  # fmt: skip
        except ConnectionFailedError:
            if not rel.origin_url:
                raise
            return await self._ask(rel.origin, rel.origin_url, rel.vm_uuid)

    # -- answering (on any host) ---------------------------------------------------------

    async def answer(self, call: Call[NoBody]) -> wire.VmState:
        s = self.steps
        vm_uuid = call.params["uuid"]
        caller = caller_of(call.caller)
        record = s.catalog.find(vm_uuid)
        rel = s.catalog.relationship(vm_uuid)
        if record is None:
            raise NotFoundError(f"no VM {vm_uuid} on host {s.config.name!r}")
        if rel is None:
            raise AuthError(f"host {caller.name!r} is not a partner of VM {record.name!r}: it "
                            f"is not replicated on host {s.config.name!r}; refused")  # fmt: skip
        if call.query.get("ask") == "primary":
            return await self._relay(caller, rel)
        if rel.role is Role.PRIMARY and rel.replica.startswith(BROKER_PREFIX) and \
                cluster_san(rel.replica[len(BROKER_PREFIX):]) in call.caller.dns_names:  # fmt: skip
            # A node of the replica cluster (its certificate names it; TLS checked the CA).
            return wire.VmState(state=record.state.value, host=s.config.name)
        extension = s.catalog.extension(vm_uuid) if rel.role is Role.REPLICA else None
        check_any_partner(caller, vm=rel.vm_name, allowed=partners(rel, extension))
        return wire.VmState(state=record.state.value, host=s.config.name)

    async def _relay(self, caller: Caller, rel: Relationship) -> wire.VmState:
        """For the host this replica is extended to: what this host's primary says."""
        s = self.steps
        extension = s.catalog.extension(rel.vm_uuid) if rel.role is Role.REPLICA else None
        if extension is None:
            raise AuthError(f"host {caller.name!r} may not ask host {s.config.name!r} about the "
                            f"primary of VM {rel.vm_name!r}: the replica here is not extended; "
                            "refused")  # fmt: skip
        check_partner(caller, vm=rel.vm_name, partner=extension.host,
                      thumbprint=extension.thumbprint, role="extended replica")  # fmt: skip
        if not rel.primary_url:
            raise ConnectionFailedError(f"no address known for host {rel.primary!r}")
        return await self._ask(rel.primary, rel.primary_url, rel.vm_uuid, pin=rel.thumbprint)
