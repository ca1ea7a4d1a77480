"""Planned failover: run from the primary, with no data lost.

The primary checks that replication can flow back (this host admits the
replica host as a primary; the replica does not run a newer functional
level), shuts the VM down cleanly, starts its QEMU with the guest stopped
(``-S``: the bitmap saved at shutdown is loaded) to cut the last delta, ends
that QEMU and asks the replica (``POST /v1/peer/replicas/{uuid}/failover``,
only from the pinned primary) to start the VM from the latest point and
reverse replication at once. The replica still asks the primary whether the
VM runs there (the split-brain guard) before it starts it, so a call that
comes while the VM runs (late, repeated, or from a faulty primary) is
refused and starts no second copy.

A cancel is honoured until the replica is asked: the VM is then started here
again if it ran before (it was shut down cleanly, so it boots as after a
reboot) and replication goes on as before.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ferry.adapters.catalog import VmRecord
from ferry.core import replication as rules
from ferry.core.cpu_models import CpuFacts, check_cpu
from ferry.core.failover import Phase
from ferry.core.relationship import Relationship
from ferry.core.replication import ReplicationState, check_partner
from ferry.core.vmstate import VmOp, VmState
from ferry.errors import FerryError, InvalidInputError, StateError
from ferry.host.failover.reverse import Reversal
from ferry.host.failover.split_brain import caller_of
from ferry.host.failover.steps import FailoverSteps
from ferry.host.failover.unplanned import Failover
from ferry.host.jobs import Job
from ferry.peer import failover as wire
from ferry.peer.client import PeerClient, Timeout
from ferry.peer.replication import HELLO, REPLICA
from ferry.peer.routes import NoBody
from ferry.peer.server import Call

log = logging.getLogger(__name__)


class PlannedFailover:
    def __init__(self, steps: FailoverSteps, failover: Failover, reversal: Reversal) -> None:
        self.steps = steps
        self.failover = failover
        self.reversal = reversal

    def _replica_host(self, rel: Relationship, timeout: Timeout = Timeout.CONTROL) -> PeerClient:
        return self.steps.peers.connect(rel.replica, rel.replica_url, timeout=timeout,
                                        pin=rel.thumbprint)  # fmt: skip

    # -- on the primary ----------------------------------------------------------------

    def check(self, name: str) -> tuple[VmRecord, Relationship]:
        record, rel = self.steps.replication.primary_of(name)
        # Resynchronising is allowed: the final cycle, with the guest off, is then the
        # resync, and it ends with the replica equal to the disk. Refusing it left a
        # planned failover killed in its final cycle neither completable nor cancellable.
        if rel.state not in (ReplicationState.REPLICATING, ReplicationState.RESYNCHRONISING):
            raise StateError(f"replication of VM {name!r} is {rel.state.value}; a planned "
                             "failover needs it replicating")  # fmt: skip
        return record, rel

    async def run(self, job: Job, record: VmRecord, rel: Relationship) -> dict[str, Any]:
        s = self.steps
        name = record.name
        started = time.monotonic()
        # Replication must be able to flow back: this host admits the replica
        # host, and the replica does not run a newer level than this host.
        s.store.server.admit(rel.replica)
        async with self._replica_host(rel) as peer:
            hello = await peer.call(HELLO)
            rules.check_reverse_allowed(hello.functional_level, s.config.functional_level,
                                        running_host=rel.replica, old_primary=s.config.name,
                                        vm=name)  # fmt: skip
            replica = await peer.call(REPLICA, uuid=rel.vm_uuid)
        # The replica host must run the VM's CPU model (it says which in hello).
        check_cpu(record.spec.cpu_model, CpuFacts(host=rel.replica, models=hello.cpu_models),
                  vm=name)  # fmt: skip
        # ... and have the networks the replica VM's NICs are on there (its spec
        # holds the map's names), before the VM is shut down here.
        if replica.missing_networks:
            raise InvalidInputError(
                f"host {rel.replica!r} has no network {replica.missing_networks[0]!r}, which the "
                f"replica of VM {name!r} is on there; add it there or change the map "
                f"('ferry replication set {name} --network-map SRC=DST')"
            )
        # ... with their bridges (a bridge deleted after the network was added).
        if replica.missing_bridges:
            raise InvalidInputError(
                f"host {rel.replica!r}: network {replica.missing_bridges[0]}, which the replica "
                f"of VM {name!r} is on there, has no bridge; create the bridge there or change "
                f"the map ('ferry replication set {name} --network-map SRC=DST'); VM {name!r} "
                "runs on here"
            )
        s.phase(job, Phase.SHUTTING_DOWN)
        record = s.vms.get(name)
        running = record.state in (VmState.RUNNING, VmState.PAUSED)
        s.jobs.update(job, was_running=running)  # what a cancel puts back
        if running:
            _, forced = await s.vms.stop(name)
            if forced:
                log.warning("VM %s did not shut down in time; it was forced off", name)
        s.phase(job, Phase.FINAL_CYCLE)
        # The guest is off; QEMU comes back with it stopped so the last
        # delta can be cut from the bitmap saved at shutdown.
        await s.vms.start(name, paused=True)
        try:
            outcome = await s.replication.sync_now(name)
        finally:
            await self.end_stopped_qemu(s.vms.get(name))
        if outcome["result"] != "ok":
            raise FerryError(f"the last replication cycle failed: {outcome.get('error')}; "
                             f"VM {name!r} stays here, off")  # fmt: skip
        s.jobs.update(job, last_point=outcome.get("point"))
        s.phase(job, Phase.STARTING_ON_REPLICA)
        # Waits while the replica boots the VM and reverses replication.
        async with self._replica_host(rel, Timeout.TRANSFER) as peer:
            there = await peer.call(wire.PLANNED, uuid=rel.vm_uuid)
        return {"result": "ok", "host": rel.replica, "point": there.point,
                "total_s": round(time.monotonic() - started, 3)}  # fmt: skip

    async def end_stopped_qemu(self, record: VmRecord) -> None:
        """End the QEMU that held the guest stopped for the last delta: the VM is off."""
        await self.steps.vms.end_qemu(record)
        if record.state is not VmState.OFF:
            self.steps.vms.apply(record.uuid, VmOp.STOPPED)

    async def undo(self, job: Job, name: str) -> None:
        """A cancelled planned failover: the VM runs here again if it ran before."""
        record = self.steps.vms.get(name)
        if job.detail.get("was_running") and record.state is VmState.OFF:
            await self.steps.vms.start(name)
            log.info("VM %s: planned failover cancelled; the VM runs here again", name)

    # -- on the replica ----------------------------------------------------------------

    async def planned_here(self, call: Call[NoBody]) -> wire.FailedOver:
        """The primary shut the VM down and sent its last delta: start it, then reverse."""
        s = self.steps
        vm_uuid = call.params["uuid"]
        rel = s.store.relationship(vm_uuid)
        check_partner(caller_of(call.caller), vm=rel.vm_name, partner=rel.primary,
                      thumbprint=rel.thumbprint)  # fmt: skip
        record = s.catalog.get(vm_uuid)
        result = await self.failover.start(record.name, None)
        # Reverse at once: the old primary's disks are the initial copy. It is
        # told to yield by the reversal itself (its VM is off by now).
        await self.reversal.reverse(record.name)
        return wire.FailedOver.model_validate(result)
