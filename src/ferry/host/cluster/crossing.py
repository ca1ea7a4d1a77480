"""A live move of a clustered VM into another cluster, with no instant unprotected.

Theory of operation. ``vm move VM --to-cluster C2`` runs on the VM's owner in
C1 (the source). :meth:`ClusterCrossing.plan` checks everything against C2's
records before any job exists (:mod:`ferry.core.cluster.crossing`: the
cluster, its volume, its level, the name; placement picks the node or checks
``--to``); the API then asks the chosen node about CPU models and networks
(the move's pre-flight) and starts an ordinary live move to it, shared-nothing
onto ``<C2 volume>/<uuid>/`` unless C2 sees the VM's volume at the same path.

Until the switch-over nothing changes in either store: C1 owns the VM, so if
the source node dies mid-copy, C1's HA restarts it on another C1 node (and the
move is gone with its source). At the switch-over (the source's QEMU paused
with the stream complete, before the destination resumes),
:meth:`CrossingGuard.before_switch` runs **one transaction** on the store the
two clusters share: it compares C1's ``owner`` at the revision read (still
this node, no move pending) and C2's name and role absent; it deletes the
VM's role in C1 and puts its role in C2 with ``owner`` settled on the
destination node and ``want`` running. So at every revision exactly one
cluster owns the VM: before it C1, from it C2, never both and never neither
(``unprotected_s`` is measured from the revisions: 0). Why C2 owns it a moment
*before* the destination resumes: if the destination node dies then, C2's
HA restarts the VM from the copied disks (complete: the stream finished),
while the source, which cannot learn that its destination resumed, stays
paused and never runs it again; had C1 kept it, a lost source node in that
moment would have C1 restart it while C2 runs it too.

If the destination cannot resume, :meth:`CrossingGuard.after_switch` takes
the VM back with the reverse transaction (C2's owner unchanged since the
hand-over); only if that wins does the source resume. Two clusters in
different etcds are unknown to each other here: the refusal says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping
from pathlib import Path

from ferry.core.cluster.crossing import (
    check_level,
    check_name_free,
    check_target,
    choose_volume,
    crossed_spec,
    role_ops,
    unprotected_s,
)
from ferry.core.cluster.keys import ROOT, ClusterKeys, cluster_names
from ferry.core.cluster.nodes import node_views
from ferry.core.cluster.placement import VmDemand, place
from ferry.core.cluster.records import ClusterMeta, EventRecord, VolumeRecord
from ferry.core.cluster.roles import Owner, VmRole, Want, encode_role
from ferry.core.cluster.store import Compare
from ferry.core.migration import Storage
from ferry.core.network import apply_network_map
from ferry.core.vmstate import VmState
from ferry.errors import FerryError, InvalidInputError, MoveFailedError, StateError
from ferry.host.cluster.membership import append_event
from ferry.host.cluster.switchover import RECLAIM_WAIT_S, OwnerHandover
from ferry.host.cluster.vms import ClusterVms
from ferry.host.jobs import JobRegistry

log = logging.getLogger(__name__)

LEFT = "vm-left-cluster"  # cluster event kinds
ARRIVED = "vm-arrived-from-cluster"


@dataclasses.dataclass
class Crossing:
    """One planned move from this node's cluster into ``target``."""

    vm: str
    uuid: str
    source: str  # cluster
    target: str  # cluster
    node: str  # the destination node in ``target``
    url: str
    volume: str  # in ``target``
    storage: Storage
    role: VmRole  # as ``target`` will keep it
    old_role: bytes = b""  # C1's config record, to put back on a take-back
    old_want: bytes = b""
    old_dir: str | None = None  # C1's ``<volume>/<uuid>/`` (its copy goes when the move ends)
    revision: int = 0  # the hand-over's revision (release and take)
    released_at: float = 0.0
    job: str = ""  # the move's job id, once it exists


class ClusterCrossing:
    """Plans moves of this node's clustered VMs into other clusters; see the docstring."""

    def __init__(self, cluster_vms: ClusterVms, jobs: JobRegistry) -> None:
        self.cvms = cluster_vms
        self.jobs = jobs
        self.plans: dict[str, Crossing] = {}  # move job id -> its crossing
        self.hold_after_handover_s = 0.0  # host.toml's test hook of that name

    async def plan(self, name: str, *, target: str, volume: str | None, to: str | None,
                   network_map: Mapping[str, str]) -> Crossing:  # fmt: skip
        """Every check against ``target`` before anything starts (one line if refused)."""
        record = self.cvms.vms.get(name)
        source = self.cvms.cluster_of(record.uuid)
        if source is None:
            raise InvalidInputError(f"VM {name!r} is in no cluster: --to-cluster moves a "
                                    f"clustered VM; 'ferry cluster vm add {name} --cluster C' "
                                    "first, or move it with --to HOST")  # fmt: skip
        m = self.cvms.membership()
        store = m.store
        keys = ClusterKeys(target)
        meta = await store.get(keys.meta)
        known = [target] if meta is not None else cluster_names(
            [e.key for e in await store.range(ROOT) if e.key.endswith("/meta")])  # fmt: skip
        check_target(name, source=source, target=target, known=known)
        assert meta is not None
        if record.state is not VmState.RUNNING:
            raise StateError(f"cannot move VM {name!r} into cluster {target!r}: it is "
                             f"{record.state.value} (a live move takes running VMs)")  # fmt: skip
        await self.cvms.owned_here(m, record, "move")
        role = await self.cvms.role_of(m, record.uuid)
        if role is None:
            raise StateError(f"VM {name!r} has no config in cluster {source!r}")
        spec = record.spec
        records = [VolumeRecord.from_json(e.value) for e in await store.range(keys.volumes)]
        volumes = {r.name: r.path for r in records}
        chosen = choose_volume(target, volume, role.volume, volumes)
        check_level(name, spec.config_version, target, ClusterMeta.from_json(meta.value)
                    .functional_level)  # fmt: skip
        names = {ClusterKeys.last_part(e.key): e.value.decode()
                 for e in await store.range(keys.names)}  # fmt: skip
        check_name_free(name, target, names, record.uuid)
        nodes = node_views(await store.range(keys.prefix), keys)
        node = place(VmDemand(name, spec.memory, spec.config_version), nodes, host=to)
        url = next(n.url for n in nodes if n.name == node)
        own = (await self.cvms.volumes(m)).get(role.volume)
        shared = own is not None and Path(own).resolve() == Path(volumes[chosen]).resolve()
        storage = Storage.SHARED if shared else Storage.COPY
        crossed = spec if shared else crossed_spec(spec, volumes[chosen])
        crossed = apply_network_map(crossed, network_map)
        new_role = VmRole(spec=crossed, priority=role.priority, volume=chosen)
        old_dir = None if shared or own is None else str(Path(own) / record.uuid)
        return Crossing(vm=name, uuid=record.uuid, source=source, target=target, node=node,
                        url=url, volume=chosen, storage=storage, role=new_role,
                        old_dir=old_dir)  # fmt: skip

    def started(self, job_id: str, crossing: Crossing) -> None:
        """The move job of ``crossing`` exists: its switch-over hands the VM over."""
        for old in [j for j in self.plans if self.jobs.find(j) is None]:
            del self.plans[old]
        self.plans[job_id] = crossing
        crossing.job = job_id
        into = crossing.volume if crossing.storage is Storage.COPY else None
        self.jobs.update(self.jobs.get(job_id), to_cluster=crossing.target, into_volume=into)


class CrossingGuard:
    """The move's switch guard: a crossing's hand-over, else the in-cluster one."""

    def __init__(self, crossing: ClusterCrossing, inner: OwnerHandover) -> None:
        self.crossing = crossing
        self.inner = inner

    async def before_switch(self, vm_uuid: str, target: str, job: str) -> None:
        plan = self.crossing.plans.get(job)
        if plan is None:
            await self.inner.before_switch(vm_uuid, target, job)
            return
        try:
            await self._hand_over(plan)
        except MoveFailedError:
            raise
        except FerryError as exc:
            raise MoveFailedError(f"cannot hand VM {plan.vm!r} over to cluster "
                                  f"{plan.target!r}: {exc}") from exc  # fmt: skip

    async def _hand_over(self, plan: Crossing) -> None:
        cvms = self.crossing.cvms
        m = cvms.membership()
        k1, k2, uuid = m.keys, ClusterKeys(plan.target), plan.uuid
        owner, entry = await cvms.owner_entry(m, uuid)
        if owner is None or entry is None or owner.node != cvms.node or owner.pending:
            held = "nobody" if owner is None else owner.node
            raise MoveFailedError(f"cluster {plan.source} says node {held} owns the VM, not "
                                  f"{cvms.node}; it stays here")  # fmt: skip
        config = await m.store.get(k1.vm_config(uuid))
        want = await m.store.get(k1.vm_want(uuid))
        plan.old_role = config.value if config is not None else encode_role(plan.role)
        plan.old_want = want.value if want is not None else Want.RUNNING.value.encode()
        now = time.time()
        result = await m.store.txn(
            [Compare.unchanged(entry.key, entry.mod_revision), Compare.absent(k2.name(plan.vm)),
             Compare.absent(k2.vm_config(uuid)), Compare.absent(k2.vm_owner(uuid))],
            [*role_ops(k1, uuid, plan.vm, None),
             *role_ops(k2, uuid, plan.vm, (encode_role(plan.role), plan.node,
                                             Want.RUNNING.value.encode()))],
        )  # fmt: skip
        if not result.succeeded:
            raise MoveFailedError(f"VM {plan.vm!r} changed in cluster {plan.source} or "
                                  f"{plan.target} meanwhile; it stays on {cvms.node}")  # fmt: skip
        plan.revision, plan.released_at = result.revision, now
        log.info("VM %s: owned by cluster %s (node %s) from revision %d, released by %s in "
                 "the same transaction", plan.vm, plan.target, plan.node, result.revision,
                 plan.source)  # fmt: skip
        job = self.crossing.jobs.find(plan.job)
        if job is not None:  # a restart must finish it there, never resume it here
            self.crossing.jobs.update(job, durable=True, handover_revision=result.revision)
        hold = self.crossing.hold_after_handover_s
        if hold > 0:
            log.warning("test hook hold_after_handover_s: waiting %.1f s", hold)
            await asyncio.sleep(hold)

    async def after_switch(self, vm_uuid: str, target: str, job: str, *, resumed: bool) -> bool:
        plan = self.crossing.plans.pop(job, None)
        if plan is None:
            return await self.inner.after_switch(vm_uuid, target, job, resumed=resumed)
        cvms = self.crossing.cvms
        if not resumed:
            return await self._take_back(plan)
        cvms.mark(vm_uuid, None)
        m = cvms.membership()
        k2 = ClusterKeys(plan.target)
        taken = await m.store.get(k2.vm_owner(vm_uuid))
        taken_revision = taken.create_revision if taken is not None else plan.revision + 1
        taken_at = Owner.decode(taken.value).since if taken is not None else time.time()
        gap = unprotected_s(released_revision=plan.revision, taken_revision=taken_revision,
                            released_at=plan.released_at, taken_at=taken_at)  # fmt: skip
        job_record = self.crossing.jobs.find(job)
        if job_record is not None:
            self.crossing.jobs.update(job_record, result_extra={
                "cluster": plan.target, "from_cluster": plan.source, "unprotected_s": gap,
                "handover_revision": plan.revision})  # fmt: skip
        why = (
            f"live move {job}: owned by {plan.target} from revision {plan.revision}, "
            f"unprotected {gap} s"
        )
        with contextlib.suppress(FerryError):
            await m.record_event(LEFT, vm=plan.vm, node=cvms.node,
                                 reason=f"{why}; now on {plan.node} in {plan.target}")  # fmt: skip
            await append_event(m.store, k2, EventRecord(
                at=time.time(), kind=ARRIVED, node=plan.node, vm=plan.vm,
                reason=f"{why}; from {cvms.node} in {plan.source}"))  # fmt: skip
        if plan.old_dir is not None:  # kernel and initrd of C1's copy (its disks go with it)
            await asyncio.to_thread(_remove_boot_files, Path(plan.old_dir))
        return True

    async def _take_back(self, plan: Crossing) -> bool:
        """The destination did not resume: C1 owns the VM again, or the source stays paused."""
        cvms = self.crossing.cvms
        deadline = time.monotonic() + RECLAIM_WAIT_S
        while True:
            try:
                m = cvms.membership()
                k2 = ClusterKeys(plan.target)
                result = await m.store.txn(
                    [Compare.unchanged(k2.vm_owner(plan.uuid), plan.revision),
                     Compare.absent(m.keys.vm_config(plan.uuid)),
                     Compare.absent(m.keys.name(plan.vm))],
                    [*role_ops(k2, plan.uuid, plan.vm, None),
                     *role_ops(m.keys, plan.uuid, plan.vm, (plan.old_role, cvms.node,
                                                             plan.old_want))],
                )  # fmt: skip
            except FerryError as exc:
                log.warning("VM %s: cannot take it back from cluster %s yet: %s", plan.vm,
                            plan.target, exc)  # fmt: skip
            else:
                won = "won" if result.succeeded else "it changed there: stays paused"
                log.info("VM %s: taken back from cluster %s (%s)", plan.vm, plan.target, won)
                return result.succeeded
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(1.0)


def _remove_boot_files(own_dir: Path) -> None:
    for name in ("kernel", "initrd"):
        with contextlib.suppress(OSError):
            (own_dir / name).unlink()
    with contextlib.suppress(OSError):
        own_dir.rmdir()  # only if empty: the disks are the move's to remove
