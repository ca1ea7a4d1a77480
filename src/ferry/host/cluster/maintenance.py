"""Maintenance of a cluster node: drain and resume, and raising the cluster's level.

``cluster drain NODE`` runs as a job on that node: it marks the member
``draining`` (placement sends nothing new there), then, high priority
first, places each VM the node owns on another node (fresh node views for
each, :func:`ferry.core.cluster.placement.place`) and live-migrates it there
on the shared volume (ownership follows at the switch-over,
:mod:`.switchover`); a VM that is off only changes owner, by
compare-and-swap. The first VM it cannot place or move stops the job with
one line that names the VM and why; the node stays draining, and what
moved stays moved. ``cluster resume NODE`` ends the draining mark.

``cluster upgrade-level`` raises ``meta.functional_level`` by
:func:`ferry.core.cluster.levels.upgrade_target` in one compare-and-swap.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from ferry.core.cluster.drain import DrainVm, drain_order
from ferry.core.cluster.levels import upgrade_target
from ferry.core.cluster.nodes import MemberRecord, NodeView
from ferry.core.cluster.placement import VmDemand, place
from ferry.core.cluster.records import ClusterMeta
from ferry.core.cluster.roles import Owner, decode_role
from ferry.core.cluster.store import Compare, Put
from ferry.core.migration import Phase, Storage
from ferry.core.vmstate import VmState
from ferry.errors import ConflictError, FerryError, InvalidInputError, NotFoundError
from ferry.host.cluster.membership import Membership
from ferry.host.cluster.vms import ClusterVms
from ferry.host.jobs import Job, JobRegistry
from ferry.host.migration.service import MigrationService

log = logging.getLogger(__name__)

DRAIN = "cluster-drain"


class Maintenance:
    """Drain, resume and upgrade-level; see the module docstring."""

    def __init__(self, cluster_vms: ClusterVms, migrations: MigrationService,
                 jobs: JobRegistry) -> None:  # fmt: skip
        self.cvms = cluster_vms
        self.vms = cluster_vms.vms
        self.migrations = migrations
        self.jobs = jobs
        self.node = cluster_vms.node
        jobs.on_cancel(DRAIN, jobs.request_cancel)

    async def _set_draining(self, m: Membership, node: str, draining: bool) -> MemberRecord:
        """``members/<node>.draining``, by compare-and-swap on the member record."""
        key = m.keys.member(node)
        for _ in range(5):
            entry = await m.store.get(key)
            if entry is None:
                raise NotFoundError(f"cluster {m.cluster!r} has no node {node!r}")
            member = dataclasses.replace(MemberRecord.from_json(entry.value), draining=draining)
            result = await m.store.txn([Compare.unchanged(key, entry.mod_revision)],
                                       [Put(key, member.to_json())])  # fmt: skip
            if result.succeeded:
                if node == m.node:
                    m.member = member
                return member
        raise ConflictError(f"the record of node {node!r} keeps changing; try again")

    # -- drain -------------------------------------------------------------------------

    async def start_drain(self, cluster: str, node: str) -> Job:
        m = self.cvms.membership(cluster)
        if node != self.node:
            raise InvalidInputError(f"a drain runs on the node it drains: ask host {node!r}, "
                                    f"not {self.node!r}")  # fmt: skip
        for job in self.jobs.all():
            if job.kind == DRAIN and job.state in ("running", "cancelling"):
                raise ConflictError(f"node {node!r} is already being drained (job {job.id})")
        await self._set_draining(m, node, True)
        await m.record_event("node-draining", node=node, reason="cluster drain")
        job = self.jobs.create(DRAIN, "", node, "running", cluster=cluster,
                               progress={"vms_done": 0, "vms_total": 0}, result=None,
                               error=None)  # fmt: skip
        self.jobs.run(job, self._drain(m, job))
        return job

    async def _owned(self, m: Membership) -> list[DrainVm]:
        owners = {m.keys.vm_uuid_of(e.key): Owner.decode(e.value)
                  for e in await m.store.range(m.keys.vms) if e.key.endswith("/owner")}  # fmt: skip
        mine = []
        for entry in await m.store.range(m.keys.vms):
            if not entry.key.endswith("/config"):
                continue
            uuid = m.keys.vm_uuid_of(entry.key)
            owner = owners.get(uuid)
            if owner is None or owner.node != self.node:
                continue
            role = decode_role(entry.value, key=entry.key)
            record = self.vms.catalog.find(uuid)
            running = record is not None and record.state is VmState.RUNNING
            spec = role.spec
            mine.append(DrainVm(uuid, spec.name, spec.memory, spec.config_version, role.priority,
                                running))  # fmt: skip
        return drain_order(mine)

    async def _drain(self, m: Membership, job: Job) -> dict[str, Any]:
        vms = await self._owned(m)
        moved: list[dict[str, Any]] = []
        self.jobs.update(job, progress={"vms_done": 0, "vms_total": len(vms)})
        for index, vm in enumerate(vms):
            self.jobs.checkpoint(job)
            self.jobs.update(job, progress={"vms_done": index, "vms_total": len(vms),
                                            "vm": vm.name})  # fmt: skip
            nodes = await m.nodes()
            try:
                target = place(VmDemand(vm.name, vm.memory, vm.config_version), nodes,
                               exclude={self.node})  # fmt: skip
            except FerryError as exc:
                raise FerryError(f"drain of {self.node} stopped at VM {vm.name!r}: {exc}") from exc
            if vm.running:
                await self._move(vm, _url(nodes, target), target)
            else:
                await self._hand_over_off(m, vm, target)
            moved.append({"vm": vm.name, "to": target, "live": vm.running})
            await m.record_event("vm-drained", vm=vm.name, node=target,
                                 reason=f"drain of {self.node}")  # fmt: skip
        self.jobs.update(job, progress={"vms_done": len(vms), "vms_total": len(vms)})
        await m.record_event("node-drained", node=self.node, reason=f"{len(moved)} VMs moved")
        return {"node": self.node, "cluster": m.cluster, "state": "draining", "moved": moved}

    async def _move(self, vm: DrainVm, url: str, target: str) -> None:
        move = self.migrations.start_move(vm.name, to=target, to_url=url, storage=Storage.SHARED,
                                          max_bandwidth=None, downtime_limit_ms=None)  # fmt: skip
        assert move.task is not None
        await move.task
        if move.state != Phase.DONE:
            raise FerryError(f"drain of {self.node} stopped at VM {vm.name!r}: its move to "
                             f"{target} {move.state}: {move.detail.get('error')}")  # fmt: skip

    async def _hand_over_off(self, m: Membership, vm: DrainVm, target: str) -> None:
        record = self.vms.catalog.find(vm.uuid)
        if record is not None and record.state is not VmState.OFF:
            raise FerryError(f"drain of {self.node} stopped at VM {vm.name!r}: it is "
                             f"{record.state.value}; start or stop it, then drain "
                             "again")  # fmt: skip
        owner, entry = await self.cvms.owner_entry(m, vm.uuid)
        if entry is None or owner is None or owner.node != self.node or owner.pending:
            return  # it left this node meanwhile
        result = await m.store.txn([Compare.unchanged(entry.key, entry.mod_revision)],
                                   [Put(entry.key, Owner.settled(target).encode())])  # fmt: skip
        if not result.succeeded:
            raise FerryError(f"drain of {self.node} stopped at VM {vm.name!r}: its owner "
                             "changed meanwhile")  # fmt: skip
        if record is not None:
            await self.cvms.let_go(record)

    # -- resume, upgrade-level -----------------------------------------------------------

    async def resume(self, cluster: str, node: str) -> dict[str, Any]:
        m = self.cvms.membership(cluster)
        for job in self.jobs.all():
            if job.kind == DRAIN and job.vm_name == node and job.state == "running":
                raise ConflictError(f"node {node!r} is being drained (job {job.id}): "
                                    f"'ferry job cancel {job.id}' first")  # fmt: skip
        member = await self._set_draining(m, node, False)
        # A node that fenced itself is placed on and starts VMs again once resumed.
        await m.store.delete(m.keys.fenced(node))
        await m.record_event("node-resumed", node=node, reason="cluster resume")
        return {"cluster": cluster, "node": member.name, "draining": False}

    async def upgrade_level(self, cluster: str) -> dict[str, Any]:
        m = self.cvms.membership(cluster)
        entry = await m.store.get(m.keys.meta)
        if entry is None:
            raise NotFoundError(f"cluster {cluster!r} has no meta record in the store")
        meta = ClusterMeta.from_json(entry.value)
        members = [MemberRecord.from_json(e.value) for e in await m.store.range(m.keys.members)]
        levels = {member.name: member.functional_level for member in members}
        level = upgrade_target(cluster, meta.functional_level, levels)
        raised = dataclasses.replace(meta, functional_level=level)
        result = await m.store.txn([Compare.unchanged(entry.key, entry.mod_revision)],
                                   [Put(entry.key, raised.to_json())])  # fmt: skip
        if not result.succeeded:
            raise ConflictError(f"cluster {cluster!r} changed while its level was raised; "
                                "try again")  # fmt: skip
        await m.refresh_meta()
        await m.record_event("level-raised", reason=f"functional level {meta.functional_level} "
                             f"-> {level}")  # fmt: skip
        return {"cluster": cluster, "functional_level": level, "was": meta.functional_level}


def _url(nodes: list[NodeView], name: str) -> str:
    return next(node.url for node in nodes if node.name == name)
