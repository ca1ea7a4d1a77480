"""Failover's peer endpoints: who may call them, and the split-brain guard across hosts.

host-1 is the primary, host-2 the replica, host-3 either a stranger (a host
of the same CA with no part in the VM) or the host host-2 is extended to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from ferry.adapters.pki import Role as CertRole
from ferry.errors import AuthError, ConflictError, NotFoundError, ThumbprintMismatchError
from ferry.host import jobs as jobs_module
from ferry.peer import failover as wire
from ferry.peer.routes import Route
from ferry.testing.failover import FailoverHost, extend, failover_host, replicate
from ferry.testing.peers import MemoryNetwork, host_cert


@dataclass
class Lab:
    network: MemoryNetwork
    one: FailoverHost
    two: FailoverHost
    three: FailoverHost
    uuid: str

    def snapshot(self) -> list[object]:
        """Everything a refused call must leave as it was."""
        hosts = (self.one, self.two, self.three)
        return [(h.catalog.relationships(), h.catalog.vms(), [j.state for j in h.jobs.all()],
                 list(h.vms.calls), list(h.replication.calls)) for h in hosts]  # fmt: skip

    def call(self, frm: str, to: str, route: Route, *, query: dict[str, str] | None = None,
             uuid: str | None = None) -> object:  # fmt: skip
        async def go() -> object:
            async with self.network.connector(frm).connect(to, f"https://{to}") as peer:
                return await peer.call(route, query=query, uuid=uuid or self.uuid)

        return asyncio.run(go())


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    monkeypatch.setattr(jobs_module, "PERSIST_EVERY_S", 0.0)
    network = MemoryNetwork()
    hosts = [failover_host(network, tmp_path, f"host-{i}") for i in (1, 2, 3)]
    uuid = replicate(network, hosts[0], hosts[1])
    yield Lab(network, *hosts, uuid=uuid)
    for host in hosts:
        host.catalog.close()


# Each failover endpoint, on the host that answers it.
ENDPOINTS = [
    (wire.VM_STATE, "host-1", None),  # the primary: does the VM run here?
    (wire.VM_STATE, "host-2", None),  # the replica
    (wire.VM_STATE, "host-2", wire.ASK_PRIMARY),  # relayed: only for an extended host
    (wire.YIELD, "host-1", None),  # the old primary gives the VM up
    (wire.PLANNED, "host-2", None),  # the replica starts it (planned)
]


@pytest.mark.parametrize(("route", "on", "query"), ENDPOINTS,
                         ids=[f"{r.method} {r.path}{'?' if q else ''} on {h}"
                              for r, h, q in ENDPOINTS])  # fmt: skip
def test_a_third_host_is_refused_and_nothing_changes(
    lab: Lab, route: Route, on: str, query: dict[str, str] | None
) -> None:
    before = lab.snapshot()
    with pytest.raises(AuthError) as info:
        lab.call("host-3", on, route, query=query)
    line = str(info.value)
    assert "'host-3'" in line and "refused" in line and "\n" not in line
    assert lab.snapshot() == before


def test_a_partner_may_ask_whether_the_vm_runs_and_nobody_learns_of_unknown_vms(
    lab: Lab,
) -> None:
    assert lab.call("host-2", "host-1", wire.VM_STATE) == wire.VmState(
        state="running", host="host-1"
    )
    assert lab.call("host-1", "host-2", wire.VM_STATE) == wire.VmState(
        state="replica", host="host-2"
    )
    with pytest.raises(NotFoundError):
        lab.call("host-3", "host-1", wire.VM_STATE, uuid="no-such-vm")


def test_only_the_pinned_partner_counts_not_its_name(lab: Lab) -> None:
    # A host named host-2 with another certificate (thumbprint) is not host-2.
    lab.network.certs["host-2"] = replace(host_cert("host-2"), thumbprint="0" * 64)
    with pytest.raises(AuthError, match="not the replica host of VM 'web'"):
        lab.call("host-2", "host-1", wire.YIELD)
    assert lab.one.rel(lab.uuid) is not None


def test_an_admin_may_ask(lab: Lab) -> None:
    lab.network.join("admin", lab.three.server, host_cert("admin", role=CertRole.ADMIN))
    assert lab.call("admin", "host-1", wire.VM_STATE).state == "running"  # type: ignore[attr-defined]


def test_the_old_primary_does_not_yield_while_its_copy_runs(lab: Lab) -> None:
    with pytest.raises(ConflictError, match="is running on host 'host-1' as well"):
        lab.call("host-2", "host-1", wire.YIELD)
    assert lab.one.rel(lab.uuid) is not None


def test_the_replica_starts_no_second_copy_when_the_primary_asks_while_its_vm_runs(
    lab: Lab,
) -> None:
    # A planned failover's call that comes while the VM runs on the primary (late,
    # repeated after a cancel started it there again, or from a faulty primary).
    before = lab.snapshot()
    with pytest.raises(ConflictError, match="still runs on host 'host-1'"):
        lab.call("host-1", "host-2", wire.PLANNED)
    assert lab.snapshot() == before
    asyncio.run(lab.one.vms.stop("web"))  # the primary shut it down: now it may start
    assert lab.call("host-1", "host-2", wire.PLANNED).host == "host-2"  # type: ignore[attr-defined]
    assert ("start", "web") in lab.two.vms.calls


def test_a_host_that_answers_but_will_not_say_refuses_the_failover(lab: Lab) -> None:
    rel = lab.two.rel(lab.uuid)
    assert rel is not None
    guard = lab.two.failover.guard
    lab.network.certs["host-1"] = replace(host_cert("host-1"), thumbprint="1" * 64)
    with pytest.raises(ConflictError, match="answers but does not say"):
        asyncio.run(guard.check(rel))
    lab.network.leave("host-1")  # lost: it cannot run anything we would see
    asyncio.run(guard.check(rel))


def test_an_extended_replica_learns_about_the_origin_through_the_replica_host(
    lab: Lab,
) -> None:
    extend(lab.network, lab.two, lab.three, lab.uuid)
    rel = lab.three.rel(lab.uuid)
    assert rel is not None and rel.origin == "host-1"
    guard = lab.three.failover.guard
    with pytest.raises(ConflictError, match="still runs on host 'host-1'"):
        asyncio.run(guard.check(rel))
    relayed = ("host-2", "host-1", "GET", f"/v1/peer/vms/{lab.uuid}")
    assert relayed in lab.network.calls  # host-2 asked its own primary for host-3
    # host-1 does not know host-3: asked directly, it refuses.
    with pytest.raises(AuthError, match="not a partner of VM 'web'"):
        lab.call("host-3", "host-1", wire.VM_STATE)
    asyncio.run(lab.one.vms.kill("web"))
    asyncio.run(guard.check(rel))  # now the failover may go ahead


def test_with_the_replica_host_lost_the_origin_is_asked_directly(lab: Lab) -> None:
    extend(lab.network, lab.two, lab.three, lab.uuid)
    rel = lab.three.rel(lab.uuid)
    assert rel is not None
    lab.network.leave("host-2")
    # host-1 answers but does not know host-3: it might run the VM, so no.
    with pytest.raises(ConflictError, match="host 'host-1' answers but does not say"):
        asyncio.run(lab.three.failover.guard.check(rel))


def test_a_pinned_thumbprint_mismatch_is_an_auth_error(lab: Lab) -> None:
    assert issubclass(ThumbprintMismatchError, AuthError)  # the guard reads both alike
