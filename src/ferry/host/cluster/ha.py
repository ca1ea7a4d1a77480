"""The HA leader's pass: restart lost nodes' VMs elsewhere, by compare-and-swap on owners.

Each pass (the node loop runs one per ``leader_poll_s`` while this node
leads) reads the cluster's prefix once, asks :func:`ferry.core.cluster.ha.plan`
what to do, and applies each restart as one transaction: the VM's ``owner``
still at the revision read, the lost node's ``alive`` key still absent, and
the leader key still this node's. Only then does ``owner`` name the new node,
whose reconciler starts the VM. The replica VMs a lost node held for the
replica broker (``replicas/<uuid>/owner``) go to an up node the same way;
nothing starts there (:mod:`ferry.host.replication.broker`). Events record
each node found lost, each restart and each refusal (once while the VM stays refused); every
:data:`PRUNE_EVERY` passes the leader trims the events log to its last 1000.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ferry.core.cluster.ha import HaPlan, Restart, plan
from ferry.core.cluster.records import EventKind
from ferry.core.cluster.roles import Owner
from ferry.core.cluster.store import Compare, Put
from ferry.core.replication.broker import ReOwn, reowns
from ferry.host.cluster.membership import Membership

log = logging.getLogger(__name__)

# The leader trims the events log to Membership's EVENTS_KEPT every this many passes.
PRUNE_EVERY = 240


@dataclass
class PassResult:
    plan: HaPlan
    moved: list[Restart] = field(default_factory=list)
    lost_races: list[Restart] = field(default_factory=list)


class HaLeader:
    """What the leader of one membership does each round; see the module docstring."""

    def __init__(self, membership: Membership) -> None:
        self.membership = membership
        self._seen_lost: set[str] = set()
        self._refusals: dict[str, str] = {}
        self._passes = 0

    async def pass_once(self) -> PassResult:
        m = self.membership
        if self._passes % PRUNE_EVERY == 0:
            await m.prune_events()
        self._passes += 1
        entries = await m.store.range(m.keys.prefix)
        result = PassResult(plan(entries, m.keys))
        for node in sorted(set(result.plan.lost) - self._seen_lost):
            await m.record_event(EventKind.NODE_DOWN, node=node,
                                 reason="its lease expired (alive record gone)")  # fmt: skip
        self._seen_lost = set(result.plan.lost)
        for restart in result.plan.restarts:
            if await self._move(restart):
                result.moved.append(restart)
                self._refusals.pop(restart.uuid, None)
            else:
                result.lost_races.append(restart)
        for reown in reowns(entries, m.keys):  # the replica broker's replica VMs
            await self._reown(reown)
        # A refusal is recorded once while the VM stays refused (its reason's
        # numbers move with every pass as other VMs land).
        still = {refused.uuid for refused in result.plan.refused}
        self._refusals = {uuid: why for uuid, why in self._refusals.items() if uuid in still}
        for refused in result.plan.refused:
            if refused.uuid not in self._refusals:
                self._refusals[refused.uuid] = refused.reason
                await m.record_event(EventKind.RESTART_REFUSED, vm=refused.vm,
                                     node=refused.source, reason=refused.reason)  # fmt: skip
        return result

    async def _reown(self, reown: ReOwn) -> bool:
        """A lost node's replica VM (replica broker) goes to an up node; nothing starts:
        the primary's next cycle locates it there."""
        m = self.membership
        done = await self._swap(m.keys.replica_owner(reown.uuid), reown.owner_revision,
                                source=reown.source, target=reown.target)  # fmt: skip
        if done:
            await m.record_event("replica-reowned", vm=reown.uuid, node=reown.target,
                                 reason=f"node {reown.source} lost its lease; the replica VM "
                                 f"is held by {reown.target} from its next cycle")  # fmt: skip
        return done

    async def _swap(self, owner_key: str, revision: int, *, source: str, target: str) -> bool:
        """``owner_key`` names ``target`` if it is still at ``revision``, ``source`` still
        has no lease and this node still leads."""
        m = self.membership
        done = await m.store.txn(
            [Compare.unchanged(owner_key, revision),
             Compare.absent(m.keys.alive(source)),
             Compare.holds(m.keys.leader, m.node.encode())],
            [Put(owner_key, Owner.settled(target).encode())],
        )  # fmt: skip
        return done.succeeded

    async def _move(self, restart: Restart) -> bool:
        m = self.membership
        if not await self._swap(m.keys.vm_owner(restart.uuid), restart.owner_revision,
                                source=restart.source, target=restart.target):  # fmt: skip
            log.info("HA restart of %s on %s lost its compare-and-swap; next pass reads again",
                     restart.vm, restart.target)  # fmt: skip
            return False
        await m.record_event(EventKind.RESTART, vm=restart.vm, node=restart.target,
                             reason=restart.reason)  # fmt: skip
        return True
