"""Reversing replication after a failover: the failed-over VM replicates back.

On the host where the VM now runs, ``reverse`` checks that the old primary
may become the replica (functional levels), makes it give the VM up
(``POST /v1/peer/replications/{uuid}/yield``, answered by
:meth:`Reversal.yield_primary` there, only for the pinned replica host and
refused while the VM runs there too), completes the failover and enables
replication the other way with ``--initial existing``: the old primary's
disks are the initial copy and only blocks whose hashes differ travel.
"""

from __future__ import annotations

import logging
from typing import Any

from ferry.core import replication as rules
from ferry.core.failover import FailoverOp, FailoverState, Phase
from ferry.core.failover import advance as failover_advance
from ferry.core.network import reverse_network_map
from ferry.core.relationship import InitialMethod, Role
from ferry.core.replication import check_partner
from ferry.core.vmstate import VmState
from ferry.errors import ConflictError, ConnectionFailedError, NotFoundError, StateError
from ferry.host.failover.split_brain import caller_of
from ferry.host.failover.steps import FailoverSteps
from ferry.host.failover.unplanned import Failover
from ferry.host.jobs import Job
from ferry.peer import failover as wire
from ferry.peer.client import Timeout
from ferry.peer.replication import HELLO
from ferry.peer.routes import NoBody
from ferry.peer.server import Call

log = logging.getLogger(__name__)


class Reversal:
    def __init__(self, steps: FailoverSteps, failover: Failover) -> None:
        self.steps = steps
        self.failover = failover

    async def reverse(self, name: str, job: Job | None = None) -> dict[str, Any]:
        """After a failover: replicate back, the old primary's disks as initial copy."""
        s = self.steps
        _, rel = s.replica(name)
        s.check(rel, FailoverOp.REVERSE)
        if rel.origin:
            raise StateError(
                f"VM {name!r} failed over on an extended replica: ferry cannot reverse "
                f"replication from there to {rel.primary!r} yet; the VM runs on, protect it "
                "by hand for now"
            )
        if not rel.primary_url:
            raise ConnectionFailedError(f"no address known for the old primary {rel.primary!r}")
        s.phase(job, Phase.ASKING_OLD_PRIMARY)
        async with s.peers.connect(rel.primary, rel.primary_url, timeout=Timeout.CONTROL,
                                   pin=rel.thumbprint) as old:  # fmt: skip
            hello = await old.call(HELLO)
            rules.check_reverse_allowed(s.config.functional_level, hello.functional_level,
                                        running_host=s.config.name, old_primary=rel.primary,
                                        vm=name)  # fmt: skip
            # The old primary gives the relationship up (refused while its copy runs).
            await old.call(wire.YIELD, uuid=rel.vm_uuid)
        if rel.failover is not FailoverState.COMPLETED:
            await self.failover.complete(name)
        s.phase(job, Phase.ENABLING)
        # The relationship ends here (reversed); the chain stays on disk under
        # the running overlays, only the records go.
        failover_advance(s.store.relationship(rel.vm_uuid), FailoverOp.REVERSE,
                         host=s.config.name)  # fmt: skip
        s.catalog.delete_relationship(rel.vm_uuid)
        status = await s.replication.enable(
            name, replica=rel.primary, replica_url=rel.primary_url,
            frequency_s=rel.frequency_s, recovery_points=rel.recovery_points,
            initial=InitialMethod.EXISTING, media_dir=None, compression=True,
            # The NICs go back onto the old primary's networks (same MACs).
            network_map=reverse_network_map(rel.network_map))  # fmt: skip
        log.info("VM %s: replication reversed towards %s", name, rel.primary)
        return status

    async def yield_primary(self, call: Call[NoBody]) -> wire.Yielded:
        """On the old primary: the replica failed over; stop being the primary."""
        s = self.steps
        vm_uuid = call.params["uuid"]
        rel = s.catalog.relationship(vm_uuid)
        if rel is None or rel.role is not Role.PRIMARY:
            raise NotFoundError(f"host {s.config.name!r} is not the primary of VM {vm_uuid}")
        check_partner(caller_of(call.caller), vm=rel.vm_name, partner=rel.replica,
                      thumbprint=rel.thumbprint, role="replica host")  # fmt: skip
        record = s.catalog.find(vm_uuid)
        if record is not None and record.state not in (VmState.OFF, VmState.CRASHED):
            raise ConflictError(
                f"VM {rel.vm_name!r} is {record.state.value} on host {s.config.name!r} as "
                f"well: decide which copy wins, 'ferry vm kill {rel.vm_name} --host "
                f"{s.config.name}' the other, then reverse again"
            )
        s.replication.forget(vm_uuid)
        log.info("VM %s: failed over to %s; this host stops being its primary", rel.vm_name,
                 rel.replica)  # fmt: skip
        return wire.Yielded(vm=rel.vm_name, yielded=True)
