"""Failover between hosts without QEMU: the exact sequence of states and phases.

host-1 is the primary, host-2 the replica; both run the real failover
service, job registry, replica store and catalog (ferry.testing.failover),
and reach each other through the in-memory peer network.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ferry.core.failover import FailoverState
from ferry.core.relationship import InitialMethod
from ferry.core.replication import ReplicationState
from ferry.core.spec import NicSpec
from ferry.core.vmstate import VmState
from ferry.errors import InvalidInputError, StateError
from ferry.host import jobs as jobs_module
from ferry.host.jobs import Job
from ferry.testing.failover import FailoverHost, failover_host, replicate
from ferry.testing.netdev import FakeLinks
from ferry.testing.peers import MemoryNetwork

F = FailoverState


@dataclass
class Lab:
    network: MemoryNetwork
    one: FailoverHost
    two: FailoverHost
    uuid: str
    states: list[FailoverState]  # host-2's failover state, each time it is written

    def run(self, host: FailoverHost, action: str, *, point: int | None = None,
            force: bool = False) -> Job:  # fmt: skip
        """Start failover ``action`` on ``host`` as the API does (a job)."""
        f = host.failover
        ops: dict[str, Callable[[Job], Awaitable[dict[str, Any]]]] = {
            "test": lambda job: f.test("web", point, job),
            "stop-test": lambda job: f.stop_test("web", job),
            "start": lambda job: f.start("web", point, force=force, job=job),
            "complete": lambda job: f.complete("web", job),
            "cancel": lambda job: f.cancel("web", job),
            "reverse": lambda job: f.reverse("web", job),
        }
        if action == "planned":
            return f.start_planned("web")
        return f.run_job(action, "web", ops[action])

    def state(self, host: FailoverHost, name: str = "web") -> VmState | None:
        record = host.vm(name)
        return None if record is None else record.state


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    monkeypatch.setattr(jobs_module, "PERSIST_EVERY_S", 0.0)
    network = MemoryNetwork()
    one = failover_host(network, tmp_path, "host-1")
    two = failover_host(network, tmp_path, "host-2")
    uuid = replicate(network, one, two, points=3)
    states: list[FailoverState] = []
    put = two.catalog.put_relationship

    def spy(rel: Any) -> None:
        states.append(rel.failover)
        put(rel)

    two.catalog.put_relationship = spy  # type: ignore[method-assign]
    yield Lab(network, one, two, uuid, states)
    one.catalog.close()
    two.catalog.close()


async def ended(job: Job) -> Job:
    assert job.task is not None
    await job.task
    return job


async def until(condition: Callable[[], bool]) -> None:
    """Let the jobs run until ``condition`` holds (they announce nothing)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the jobs never got there")


def run_to_end(lab: Lab, host: FailoverHost, action: str) -> Job:
    async def go() -> Job:
        return await ended(lab.run(host, action))

    return asyncio.run(go())


def steps(job: Job) -> list[tuple[str, str | None]]:
    return job.history


RUN = "running"


def test_a_test_failover_walks_its_phases_and_leaves_nothing(lab: Lab) -> None:
    async def go() -> tuple[Job, Job]:
        started = await ended(lab.run(lab.two, "test"))
        assert lab.state(lab.two, "web-test") is VmState.RUNNING
        stopped = await ended(lab.run(lab.two, "stop-test"))
        return started, stopped

    started, stopped = asyncio.run(go())
    assert steps(started) == [(RUN, "starting"), (RUN, "creating-overlays"),
                              (RUN, "starting-vm"), ("done", "done")]  # fmt: skip
    assert started.detail["result"]["point"] == 3
    assert steps(stopped) == [(RUN, "starting"), (RUN, "deleting-vm"), (RUN, "merging"),
                              ("done", "done")]  # fmt: skip
    assert lab.states == [F.TESTING, F.NONE]
    assert lab.two.vms.calls == [("start", "web-test"), ("delete", "web-test")]
    storage = Path(lab.two.rel(lab.uuid).storage)  # type: ignore[union-attr]
    assert not list(storage.glob("test-*")) and lab.two.vm("web-test") is None
    rel = lab.two.rel(lab.uuid)
    assert rel is not None and (rel.test_vm, rel.test_point) == (None, None)
    assert lab.state(lab.two) is VmState.REPLICA  # the replica never moved


def test_an_unplanned_failover_is_refused_while_the_primary_runs_the_vm(lab: Lab) -> None:
    job = run_to_end(lab, lab.two, "start")
    assert steps(job) == [(RUN, "starting"), (RUN, "checking-primary"), ("failed", "failed")]
    assert "still runs on host 'host-1'" in job.detail["error"]
    assert lab.states == [] and lab.state(lab.two) is VmState.REPLICA


def test_an_unplanned_failover_then_complete_and_reverse(lab: Lab) -> None:
    async def go() -> list[Job]:
        await lab.one.vms.kill("web")  # the primary's copy is down
        jobs = [await ended(lab.run(lab.two, "start", point=2))]
        assert lab.state(lab.two) is VmState.RUNNING
        jobs.append(await ended(lab.run(lab.two, "complete")))
        jobs.append(await ended(lab.run(lab.two, "reverse")))
        return jobs

    start, complete, reverse = asyncio.run(go())
    assert steps(start) == [(RUN, "starting"), (RUN, "checking-primary"),
                            (RUN, "creating-overlays"), (RUN, "starting-vm"),
                            ("done", "done")]  # fmt: skip
    assert steps(complete) == [(RUN, "starting"), (RUN, "dropping-points"), ("done", "done")]
    assert steps(reverse) == [(RUN, "starting"), (RUN, "asking-old-primary"), (RUN, "enabling"),
                              ("done", "done")]  # fmt: skip
    assert lab.states == [F.FAILED_OVER, F.COMPLETED]
    assert [p.id for p in lab.two.catalog.points(lab.uuid)] == []  # the records went too
    # The old primary gave the VM up; replication now runs host-2 -> host-1.
    assert lab.one.rel(lab.uuid) is None and ("forget", lab.uuid) in lab.one.replication.calls
    assert lab.two.replication.enabled == [
        {"vm": "web", "replica": "host-1", "initial": InitialMethod.EXISTING}]  # fmt: skip
    paths = [(frm, to, path) for frm, to, _, path in lab.network.calls]
    assert ("host-2", "host-1", f"/v1/peer/vms/{lab.uuid}") in paths  # the split-brain guard
    assert ("host-2", "host-1", f"/v1/peer/replications/{lab.uuid}/yield") in paths


def test_cancelling_a_failover_makes_the_vm_a_replica_again(lab: Lab) -> None:
    async def go() -> Job:
        await ended(lab.run(lab.two, "start", force=True))  # --force: no question asked
        return await ended(lab.run(lab.two, "cancel"))

    cancel = asyncio.run(go())
    assert steps(cancel) == [(RUN, "starting"), (RUN, "stopping-vm"),
                             (RUN, "restoring-replica"), ("done", "done")]  # fmt: skip
    assert lab.states == [F.FAILED_OVER, F.NONE]
    rel = lab.two.rel(lab.uuid)
    assert rel is not None and rel.state is ReplicationState.REPLICATING
    record = lab.two.vm("web")
    assert record is not None and record.state is VmState.REPLICA
    assert Path(record.spec.disks[0].path).name == "p3-disk0.qcow2"
    assert not list(Path(rel.storage).glob("run-*"))
    assert ("host-2", "host-1", "GET", f"/v1/peer/vms/{lab.uuid}") not in lab.network.calls


def test_a_planned_failover_walks_both_hosts_and_reverses(lab: Lab) -> None:
    job = run_to_end(lab, lab.one, "planned")
    assert steps(job) == [(RUN, "checking"), (RUN, "shutting-down"), (RUN, "final-cycle"),
                          (RUN, "starting-on-replica"), ("done", "done")]  # fmt: skip
    assert job.detail["result"]["host"] == "host-2" and job.detail["result"]["point"] == 3
    assert lab.one.vms.calls == [("stop", "web"), ("start-paused", "web"), ("end-qemu", "web")]
    assert lab.state(lab.one) is VmState.OFF
    assert lab.one.replication.calls == [("sync", "web"), ("forget", lab.uuid)]
    assert lab.state(lab.two) is VmState.RUNNING
    assert lab.states == [F.FAILED_OVER, F.COMPLETED]
    assert lab.two.replication.enabled[0]["replica"] == "host-1"
    # Planned too, the replica asks the primary whether the VM runs there (it is off).
    assert ("host-2", "host-1", "GET", f"/v1/peer/vms/{lab.uuid}") in lab.network.calls


def test_a_planned_failover_cancelled_in_its_last_cycle_runs_the_vm_here_again(
    lab: Lab,
) -> None:
    gate = lab.one.replication.sync_gate = asyncio.Event()

    async def go() -> Job:
        job = lab.run(lab.one, "planned")
        await until(lambda: ("sync", "web") in lab.one.replication.calls)
        lab.one.jobs.cancel(job.id)
        assert job.state == "cancelling"
        gate.set()
        return await ended(job)

    job = asyncio.run(go())
    assert steps(job) == [(RUN, "checking"), (RUN, "shutting-down"), (RUN, "final-cycle"),
                          ("cancelling", "final-cycle"), ("cancelled", "cancelled")]  # fmt: skip
    assert lab.one.vms.calls[-2:] == [("end-qemu", "web"), ("start", "web")]
    assert lab.state(lab.one) is VmState.RUNNING
    assert lab.states == [] and lab.state(lab.two) is VmState.REPLICA
    assert not any(path.endswith("/failover") for *_, path in lab.network.calls)


def test_once_the_replica_starts_the_vm_a_planned_failover_cannot_be_cancelled(
    lab: Lab,
) -> None:
    gate = lab.two.vms.start_gate = asyncio.Event()

    async def go() -> Job:
        job = lab.run(lab.one, "planned")
        await until(lambda: ("start", "web") in lab.two.vms.calls)
        with pytest.raises(StateError, match="starting-on-replica: too late to cancel"):
            lab.one.jobs.cancel(job.id)
        gate.set()
        return await ended(job)

    assert asyncio.run(go()).state == "done"


def test_a_failover_cancelled_while_its_overlays_are_made_is_undone(lab: Lab) -> None:
    gate = asyncio.Event()
    make = lab.two.failover.steps.make_overlay
    assert make is not None

    async def slow(overlay: Path, backing: Path, size: int) -> None:
        await gate.wait()
        await make(overlay, backing, size)

    lab.two.failover.steps.make_overlay = slow

    async def go() -> Job:
        job = lab.run(lab.two, "start", force=True)
        await until(lambda: job.detail["phase"] == "creating-overlays")
        lab.two.jobs.cancel(job.id)
        gate.set()
        return await ended(job)

    job = asyncio.run(go())
    assert steps(job) == [(RUN, "starting"), (RUN, "checking-primary"),
                          (RUN, "creating-overlays"), ("cancelling", "creating-overlays"),
                          ("cancelled", "cancelled")]  # fmt: skip
    assert lab.states == [F.FAILED_OVER, F.NONE]  # the undo: a replica again
    assert lab.state(lab.two) is VmState.REPLICA and ("start", "web") not in lab.two.vms.calls


def test_kinds_that_cannot_be_cancelled_say_why(lab: Lab) -> None:
    async def go() -> None:
        await ended(lab.run(lab.two, "start", force=True))
        job = lab.run(lab.two, "complete")
        with pytest.raises(InvalidInputError, match="completing a failover deletes"):
            lab.two.jobs.cancel(job.id)
        await ended(job)
        with pytest.raises(StateError, match="has already ended"):
            lab.two.jobs.cancel(lab.two.jobs.all()[0].id)

    asyncio.run(go())


def test_a_restart_leaves_every_interrupted_failover_completable_or_cancellable(
    lab: Lab,
) -> None:
    from ferry.core.failover import FailoverOp

    two = lab.two

    async def go() -> None:
        # The decision was written, then the agent died before the overlays.
        two.failover.steps.advance(lab.uuid, FailoverOp.START, point=3)
        job = two.jobs.create("failover-start", lab.uuid, "web", "running",
                              phase="creating-overlays")  # fmt: skip
        await two.failover.recover()
        assert job.state == "failed" and "phase creating-overlays" in job.detail["error"]
        record = two.vm("web")
        assert record is not None and record.state is VmState.OFF
        assert Path(record.spec.disks[0].path).name == "run-disk0.qcow2"
        await ended(lab.run(two, "cancel"))  # cancellable, as promised

    asyncio.run(go())
    assert lab.states == [F.FAILED_OVER, F.NONE]
    assert lab.state(two) is VmState.REPLICA


def test_a_planned_failover_is_refused_before_shutdown_when_the_replica_lacks_a_network(
    lab: Lab,
) -> None:
    # The replica VM's NIC is on 'prod' there (as a map made it); host-2 has no 'prod'.
    replica = lab.two.catalog.get(lab.uuid)
    nic = NicSpec(network="prod", mac="02:00:00:00:0c:01")
    lab.two.catalog.update_spec(replica.spec.model_copy(update={"nics": (nic,)}))
    job = run_to_end(lab, lab.one, "planned")
    assert job.state == "failed"
    assert job.detail["error"].startswith("host 'host-2' has no network 'prod', which the "
                                          "replica of VM 'web' is on there")  # fmt: skip
    assert lab.one.vms.calls == []  # never shut down: it runs on here
    assert lab.state(lab.one) is VmState.RUNNING and lab.states == []


def _replica_nic_on_prod(lab: Lab) -> None:
    """The replica VM's NIC is on 'prod' there (as a map made it)."""
    replica = lab.two.catalog.get(lab.uuid)
    nic = NicSpec(network="prod", mac="02:00:00:00:0c:01")
    lab.two.catalog.update_spec(replica.spec.model_copy(update={"nics": (nic,)}))


def _prod_without_its_bridge(lab: Lab) -> None:
    """host-2 has network 'prod', but its bridge was deleted after it was added."""
    links = lab.two.store.links
    assert isinstance(links, FakeLinks)
    links.add_bridge("br-prod")
    asyncio.run(lab.two.store.networks().add("prod", "br-prod"))
    del links.spaces[None]["br-prod"]


def test_an_unplanned_failover_is_refused_when_the_replica_lacks_a_network(lab: Lab) -> None:
    _replica_nic_on_prod(lab)  # host-2 has no 'prod'

    async def go() -> Job:
        await lab.one.vms.kill("web")  # the primary's copy is down: only the network refuses
        return await ended(lab.run(lab.two, "start"))

    job = asyncio.run(go())
    assert job.state == "failed"
    assert job.detail["error"].startswith("no network named 'prod' on host 'host-2'")
    assert steps(job) == [(RUN, "starting"), ("failed", "failed")]
    assert lab.states == [] and lab.state(lab.two) is VmState.REPLICA
    rel = lab.two.rel(lab.uuid)
    assert rel is not None and rel.failover is F.NONE
    assert lab.two.vms.calls == []  # nothing started
    assert [p.id for p in lab.two.catalog.points(lab.uuid)] == [1, 2, 3]  # the points stay


def test_a_planned_failover_is_refused_before_shutdown_when_a_replica_bridge_is_gone(
    lab: Lab,
) -> None:
    _replica_nic_on_prod(lab)
    _prod_without_its_bridge(lab)
    job = run_to_end(lab, lab.one, "planned")
    assert job.state == "failed"
    wanted = ("host 'host-2': network prod (bridge br-prod), which the replica of VM 'web' "
              "is on there, has no bridge")  # fmt: skip
    assert job.detail["error"].startswith(wanted)
    assert lab.one.vms.calls == []  # never shut down: it runs on here
    assert lab.state(lab.one) is VmState.RUNNING and lab.states == []
    # With the bridge back, the replica host reports nothing missing.
    links = lab.two.store.links
    assert isinstance(links, FakeLinks)
    links.add_bridge("br-prod")
    state = asyncio.run(lab.two.store.checked_state(lab.uuid))
    assert state.missing_bridges == [] and state.missing_networks == []
