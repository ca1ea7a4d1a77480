"""Clustered VMs on this node: create, add, remove, and the checks around start, stop,
delete and move.

A clustered VM's role (config, owner, want; :mod:`ferry.core.cluster.roles`)
lives in the cluster's store; its disks, kernel and initrd on a cluster
volume (``<volume>/<uuid>/``) that every node sees at one path. The VM is in
the local catalog of its owner only (the reconciler,
:mod:`.reconciler`, registers and drops entries to match), so every command
finds it through its owner and runs there with the VM service's own code.
Ownership changes only by compare-and-swap on ``owner``'s revision: a create
or an add is one transaction that also claims ``names/<name>``; a move's
switch-over is :mod:`.switchover`; drain and resume :mod:`.maintenance`.

Which local VMs are clustered is also kept in the catalog (setting
``cluster_vms``), so fencing knows them while the store does not answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ferry.adapters.catalog import VmRecord
from ferry.core import vmstate
from ferry.core.cluster.levels import config_version_for
from ferry.core.cluster.placement import VmDemand, place
from ferry.core.cluster.records import VolumeRecord
from ferry.core.cluster.roles import Owner, Priority, VmRole, Want, decode_want, encode_role
from ferry.core.cluster.store import Compare, Delete, Entry, Op, Put
from ferry.core.migration import Storage, locate_on_volume
from ferry.core.spec import VmSpec
from ferry.errors import (
    ConflictError,
    FerryError,
    InvalidInputError,
    NotFoundError,
    StateError,
    StoreUnavailableError,
)
from ferry.host.cluster.copy_roles import copy_refusal
from ferry.host.cluster.membership import ClusterContext, Membership
from ferry.host.vms.requests import NewVm
from ferry.host.vms.service import VmService

if TYPE_CHECKING:
    from ferry.host.cluster.copy_disks import DiskCopies

log = logging.getLogger(__name__)

CLUSTERED_SETTING = "cluster_vms"


@dataclasses.dataclass(frozen=True)
class RemoteVm:
    """A clustered VM as the store has it (what a node that does not own it knows)."""

    role: VmRole
    owner: Owner | None
    cluster: str
    state: str  # as its owner last published it; "unknown" when the owner is down
    want: Want


class ClusterVms:
    """This node's side of clustered VMs; see the module docstring."""

    def __init__(self, context: ClusterContext, vms: VmService) -> None:
        self.context = context
        self.vms = vms
        self.node = vms.config.name
        raw = vms.catalog.setting(CLUSTERED_SETTING)
        # uuid -> cluster, for the local VMs that are clustered
        self.clustered: dict[str, str] = dict(json.loads(raw)) if raw else {}
        # Set by the composition from fencing: whether this node may run clustered
        # VMs now (its lease renewed in time), and what protects a new QEMU at once.
        self.lease_ok: Callable[[], bool] = lambda: True
        self.protect: Callable[[str, int], Awaitable[None]] | None = None
        # Set by the composition: copy-roles' disk copies on VMs' owners (copy_disks.py).
        self.disk_copies: DiskCopies | None = None
        self._versions: dict[str, tuple[int, int]] = {}  # uuid -> (config's revision, version)

    # -- which cluster -----------------------------------------------------------------

    def membership(self, cluster: str | None = None) -> Membership:
        """This node's membership, checked against the cluster the admin named."""
        m = self.context.membership
        if m is None:
            named = f"cluster {cluster!r}" if cluster else "any cluster"
            raise NotFoundError(f"host {self.node!r} is not a node of {named}: "
                                "'ferry cluster list' shows the clusters")  # fmt: skip
        if cluster is not None and cluster != m.cluster:
            raise NotFoundError(f"unknown cluster {cluster!r}: host {self.node!r} is a node of "
                                f"cluster {m.cluster!r}")  # fmt: skip
        return m

    def cluster_of(self, uuid: str) -> str | None:
        return self.clustered.get(uuid)

    def mark(self, uuid: str, cluster: str | None) -> None:
        """Note (or, with None, forget) that local VM ``uuid`` is clustered."""
        before = dict(self.clustered)
        if cluster is None:
            self.clustered.pop(uuid, None)
        else:
            self.clustered[uuid] = cluster
        if self.clustered != before:
            self.vms.catalog.put_setting(CLUSTERED_SETTING, json.dumps(self.clustered))

    def clustered_processes(self) -> list[tuple[str, int]]:
        """(uuid, pid) of every clustered QEMU here: what fencing kills."""
        found = []
        for uuid in self.clustered:
            pid = self.vms.pid_of(uuid)
            if pid is not None:
                found.append((uuid, pid))
        return found

    # -- reading the store ---------------------------------------------------------------

    async def volumes(self, m: Membership) -> dict[str, str]:
        """The cluster's volumes, name -> path; each is also a volume of this host."""
        entries = await m.store.range(m.keys.volumes)
        volumes = {}
        for entry in entries:
            record = VolumeRecord.from_json(entry.value)
            volumes[record.name] = record.path
        self.ensure_local_volumes(volumes)
        return volumes

    def ensure_local_volumes(self, volumes: dict[str, str]) -> None:
        """A live move finds shared disks through the host's volumes of the same name."""
        local = self.vms.catalog.volumes()
        for name, path in volumes.items():
            if name not in local:
                self.vms.catalog.add_volume(name, path)
            elif local[name] != path:
                log.warning("host volume %s is %s, cluster volume %s is %s: moves of clustered "
                            "VMs will copy their disks", name, local[name], name, path)  # fmt: skip

    async def owner_entry(self, m: Membership, uuid: str) -> tuple[Owner | None, Entry | None]:
        entry = await m.store.get(m.keys.vm_owner(uuid))
        return (Owner.decode(entry.value) if entry else None), entry

    async def role_of(self, m: Membership, uuid: str) -> VmRole | None:
        entry = await m.store.get(m.keys.vm_config(uuid))
        return VmRole.model_validate_json(entry.value) if entry else None

    async def owned_here(self, m: Membership, record: VmRecord, doing: str) -> Entry:
        """The owner entry of a clustered VM this node owns, or why it may not ``doing``."""
        owner, entry = await self.owner_entry(m, record.uuid)
        if owner is None or entry is None:
            raise NotFoundError(f"VM {record.name!r} has no owner in cluster {m.cluster!r}")
        if owner.node != self.node or owner.pending:
            where = f"is moving to {owner.node}" if owner.pending else f"is owned by {owner.node}"
            raise StateError(f"cannot {doing} VM {record.name!r} on host {self.node!r}: it "
                             f"{where} in cluster {m.cluster!r}")  # fmt: skip
        return entry

    # -- create, add, remove -----------------------------------------------------------

    async def create(
        self, request: NewVm, *, cluster: str, priority: Priority, host: str | None
    ) -> tuple[VmRecord, str]:
        """A new clustered VM, off, on the placed node. Returns the record and its owner."""
        m = self.membership(cluster)
        if request.volume is None:
            raise InvalidInputError("a clustered VM needs --volume, one of cluster "
                                    f"{cluster!r}'s volumes")  # fmt: skip
        volumes = await self.volumes(m)
        if request.volume not in volumes:
            known = ", ".join(sorted(volumes)) or "none"
            raise NotFoundError(f"cluster {cluster!r} has no volume {request.volume!r} "
                                f"(volumes: {known})")  # fmt: skip
        if await m.store.get(m.keys.name(request.name)) is not None:
            raise ConflictError(f"cluster {cluster!r} already has a VM named {request.name!r}")
        nodes = await m.nodes()
        newest = max((node.functional_level for node in nodes), default=m.functional_level)
        version = config_version_for(request.config_version, cluster, m.functional_level, newest)
        target = place(VmDemand(request.name, request.memory, version), nodes, host=host)
        request = dataclasses.replace(request, config_version=version, boot_files_on_volume=True)
        record = await self.vms.create(request)
        role = VmRole(spec=record.spec, priority=priority, volume=request.volume)
        own_dir = Path(volumes[role.volume]) / record.uuid
        try:
            claimed = await self._claim(m, role, target, Want.OFF)
        except BaseException:
            await self._drop_files(record, own_dir)
            raise
        if not claimed:
            await self._drop_files(record, own_dir)
            raise ConflictError(f"cluster {cluster!r} already has a VM named {request.name!r}")
        self.mark(record.uuid, cluster)
        if target != self.node:  # its owner's reconciler registers it there
            await self.let_go(record)
        log.info("clustered VM %s (%s) created in %s, owner %s", record.name, record.uuid,
                 cluster, target)  # fmt: skip
        await m.record_event("vm-created", vm=record.name, node=target,
                             reason=f"placed on {target} (volume {request.volume})")  # fmt: skip
        return record, target

    async def _claim(self, m: Membership, role: VmRole, owner: str, want: Want) -> bool:
        """Role, owner, want and the unique name in one transaction; False if taken."""
        uuid, name = role.spec.uuid, role.spec.name
        result = await m.store.txn(
            [Compare.absent(m.keys.name(name)), Compare.absent(m.keys.vm_config(uuid)),
             Compare.absent(m.keys.vm_owner(uuid))],
            [Put(m.keys.vm_config(uuid), encode_role(role)),
             Put(m.keys.vm_owner(uuid), Owner.settled(owner).encode()),
             Put(m.keys.vm_want(uuid), want.value.encode()),
             Put(m.keys.name(name), uuid.encode())],
        )  # fmt: skip
        return result.succeeded

    async def _drop_files(self, record: VmRecord, own_dir: Path) -> None:
        """Undo a create (or end a delete): the local entry, its disks, and the VM's own
        dir on the volume, ``<volume>/<uuid>/`` (never more: an added VM's disks may lie
        anywhere on the volume)."""
        await self.vms.forget(record, keep_disks=False)
        if own_dir.name == record.uuid:
            await asyncio.to_thread(shutil.rmtree, own_dir, True)

    async def let_go(self, record: VmRecord) -> None:
        """Drop the local entry of a VM another node owns (its files stay on the volume)."""
        await self.vms.forget(record, keep_disks=True)
        self.vms.processes.drop_lock(record.uuid)
        self.mark(record.uuid, None)

    async def add(self, cluster: str, name: str, *, priority: Priority) -> VmRecord:
        """``cluster vm add``: a VM of this host becomes clustered (owner: this node)."""
        m = self.membership(cluster)
        record = self.vms.get(name)
        if record.uuid in self.clustered:
            raise ConflictError(
                f"VM {name!r} is already in cluster {self.clustered[record.uuid]!r}"
            )
        if record.state not in (vmstate.VmState.OFF, vmstate.VmState.RUNNING):
            raise StateError(f"VM {name!r} is {record.state.value}: add it to the cluster "
                             "when it is off or running")  # fmt: skip
        volumes = await self.volumes(m)
        located = [(disk.path, locate_on_volume(disk.path, volumes)) for disk in record.spec.disks]
        outside = [path for path, where in located if where is None]
        if outside or not located:
            known = ", ".join(f"{n} at {p}" for n, p in sorted(volumes.items())) or "none"
            what = f"disk {outside[0]} is on no cluster volume" if outside else "it has no disks"
            raise InvalidInputError(f"VM {name!r} cannot join cluster {cluster!r}: {what} "
                                    f"(volumes: {known}); move its disks there first")  # fmt: skip
        volume = located[0][1][0] if located[0][1] else ""
        own_dir = Path(volumes[volume]) / record.uuid  # kernel and initrd go there
        await asyncio.to_thread(own_dir.mkdir, exist_ok=True)
        spec = await self._boot_files_to_volume(record, own_dir)
        role = VmRole(spec=spec, priority=priority, volume=volume)
        want = Want.RUNNING if vmstate.is_live(record.state) else Want.OFF
        if not await self._claim(m, role, self.node, want):
            raise ConflictError(f"cluster {cluster!r} already has a VM named {name!r}")
        self.vms.catalog.update_spec(spec)
        self.mark(record.uuid, cluster)
        await m.record_event("vm-added", vm=name, node=self.node, reason=f"volume {volume}")
        return self.vms.get(name)

    async def _boot_files_to_volume(self, record: VmRecord, vm_dir_on_volume: Path) -> VmSpec:
        """Copies of kernel and initrd next to the disks, so every node can boot the VM."""
        updates: dict[str, str] = {}
        for field in ("kernel", "initrd"):
            path = getattr(record.spec, field)
            if path and not Path(path).is_relative_to(vm_dir_on_volume):
                target = vm_dir_on_volume / field
                await asyncio.to_thread(shutil.copyfile, path, target)
                updates[field] = str(target)
        return record.spec.model_copy(update=updates)

    async def remove(self, cluster: str, name: str) -> VmRecord:
        """``cluster vm remove``: the VM stays here as a plain VM; its role goes."""
        m = self.membership(cluster)
        record = self.vms.get(name)
        if record.uuid not in self.clustered:
            raise NotFoundError(f"VM {name!r} on host {self.node!r} is not in cluster {cluster!r}")
        entry = await self.owned_here(m, record, "remove")
        result = await m.store.txn(
            [Compare.unchanged(entry.key, entry.mod_revision)],
            _role_deletes(m, record.uuid, name),
        )
        if not result.succeeded:
            raise ConflictError(f"VM {name!r} changed owner while it was being removed; try again")
        self.mark(record.uuid, None)
        await m.record_event("vm-removed", vm=name, node=self.node,
                             reason="stays on its node as a plain VM")  # fmt: skip
        return self.vms.get(name)

    # -- checks around the VM service's own operations -------------------------------------

    async def before_start(self, name: str) -> None:
        """A clustered VM starts only on its owner, and then should keep running; not one
        that ``cluster copy-roles --run`` gave to another cluster."""
        found = self.vms.catalog.find(name)
        m = self.context.membership
        if m is not None and (
            found is None
            or (found.uuid in self.clustered and await self.role_of(m, found.uuid) is None)
        ):
            # No longer a VM of this cluster (or not here): it may have been copied away.
            await self.check_copied(name, found.uuid if found is not None else None)
        record = self.vms.get(name)
        cluster = self.clustered.get(record.uuid)
        if cluster is None:
            return
        m = self.membership()
        await self.owned_here(m, record, "start")
        if not self.lease_ok() or await m.store.get(m.keys.alive(self.node)) is None:
            raise StateError(f"host {self.node!r} holds no lease in cluster {cluster!r} now, "
                             "so it may not start clustered VMs")  # fmt: skip
        await m.store.put(m.keys.vm_want(record.uuid), Want.RUNNING.value.encode())

    async def check_copied(self, name: str, uuid: str | None = None) -> None:
        """Refuse VM ``name`` here when ``cluster copy-roles --run`` gave it to another
        cluster (one line naming that cluster and ``--rollback``)."""
        m = self.context.membership
        if m is None:
            return
        try:
            why = await copy_refusal(m.store, m.cluster, name, uuid)
        except StoreUnavailableError:
            return  # the store's own refusal comes where it is needed
        if why:
            raise StateError(why)

    async def after_start(self, record: VmRecord) -> None:
        """A clustered QEMU that just started is under the fence guard at once."""
        pid = self.vms.pid_of(record.uuid)
        if self.protect is not None and pid is not None and record.uuid in self.clustered:
            await self.protect(record.uuid, pid)

    async def after_upgrade(self, record: VmRecord) -> None:
        """``vm upgrade-version``: the cluster's config gets the new version now (else the
        owner's next reconcile pass copies it, see :meth:`sync_version`)."""
        if record.uuid not in self.clustered or self.context.membership is None:
            return
        entry = await self.context.membership.store.get(
            self.context.membership.keys.vm_config(record.uuid))  # fmt: skip
        if entry is not None:
            try:
                await self.sync_version(self.context.membership, record, entry)
            except FerryError as exc:
                log.warning("VM %s: its cluster config keeps the old version for now: %s",
                            record.name, exc)  # fmt: skip

    async def sync_version(self, m: Membership, record: VmRecord, entry: Entry) -> None:
        """The owner's configuration version wins (only it; the local spec's kernel path
        may be this node's own copy, so nothing else is copied)."""
        known = self._versions.get(record.uuid)
        if known == (entry.mod_revision, record.spec.config_version):
            return  # read before, and the same (a pass does not parse every config again)
        role = VmRole.model_validate_json(entry.value)
        self._versions[record.uuid] = (entry.mod_revision, role.spec.config_version)
        if role.spec.config_version == record.spec.config_version:
            return
        spec = role.spec.model_copy(update={"config_version": record.spec.config_version})
        updated = role.model_copy(update={"spec": spec})
        await m.store.txn([Compare.unchanged(entry.key, entry.mod_revision)],
                          [Put(entry.key, encode_role(updated))])  # fmt: skip

    async def before_stop(self, name: str) -> None:
        """Stopped or killed on purpose: nobody restarts it (want = off)."""
        record = self.vms.get(name)
        if record.uuid not in self.clustered:
            return
        m = self.membership()
        await m.store.put(m.keys.vm_want(record.uuid), Want.OFF.value.encode())

    # -- a clustered VM another node owns: show, start and stop from here -----------------

    async def remote(self, name: str) -> RemoteVm | None:
        """VM ``name`` (or uuid) of this node's cluster when it is not in the local catalog
        (another node owns it), read from the store; None when the cluster has no such VM."""
        m = self.context.membership
        if m is None:
            return None
        named = await m.store.get(m.keys.name(name))
        uuid = named.value.decode() if named is not None else name
        role = await self.role_of(m, uuid)
        if role is None:
            return None
        owner, _ = await self.owner_entry(m, uuid)
        want = await m.store.get(m.keys.vm_want(uuid))
        state = "unknown"  # the owner is down (or nobody owns it): nobody can tell
        if owner is not None and await m.store.get(m.keys.alive(owner.node)) is not None:
            published = await m.store.get(m.keys.vm_state(uuid))
            state = published.value.decode() if published is not None else "unknown"
        return RemoteVm(role=role, owner=owner, cluster=m.cluster, state=state,
                        want=decode_want(want.value if want else None))  # fmt: skip

    async def want_remote(self, remote: RemoteVm, want: Want) -> RemoteVm:
        """``vm start|stop`` of a VM another node owns: its ``want`` changes, and the
        owner's reconciler (woken by the store's watch) starts or stops it."""
        m = self.membership(remote.cluster)
        name = remote.role.spec.name
        if remote.owner is None:
            raise NotFoundError(f"VM {name!r} has no owner in cluster {m.cluster!r}")
        await m.store.put(m.keys.vm_want(remote.role.spec.uuid), want.value.encode())
        log.info("VM %s (owner %s): want %s, asked on %s", name, remote.owner.node,
                 want.value, self.node)  # fmt: skip
        return dataclasses.replace(remote, want=want)

    async def delete(self, name: str, *, force: bool) -> bool:
        """Delete a clustered VM everywhere (role, then files); False if not clustered."""
        record = self.vms.get(name)
        if record.uuid not in self.clustered:
            return False
        if vmstate.is_live(record.state) and not force:
            raise ConflictError(f"VM {name!r} is {record.state.value}: stop it first or use "
                                "--force")  # fmt: skip
        if self.vms.catalog.relationship(record.uuid) is not None:
            # The VM service refuses it with the replication's remedy, before anything changes.
            await self.vms.delete(name, force=force)
        m = self.membership()
        entry = await self.owned_here(m, record, "delete")
        role = await self.role_of(m, record.uuid)
        volumes = await self.volumes(m)
        own_dir = Path(volumes.get(role.volume if role else "", "/nonexistent")) / record.uuid
        result = await m.store.txn(
            [Compare.unchanged(entry.key, entry.mod_revision)],
            _role_deletes(m, record.uuid, name),
        )
        if not result.succeeded:
            raise ConflictError(f"VM {name!r} changed owner while it was being deleted; try again")
        await self.vms.delete(name, force=force)
        await asyncio.to_thread(shutil.rmtree, own_dir, True)  # kernel, initrd, the dir
        self.mark(record.uuid, None)
        await m.record_event("vm-deleted", vm=name, node=self.node)
        return True

    async def check_move(self, name: str, to: str, storage: Storage) -> Storage:
        """A clustered VM moves only to a node of its cluster that may take it, shared."""
        record = self.vms.get(name)
        if record.uuid not in self.clustered:
            return storage
        m = self.membership()
        if storage is Storage.COPY:
            raise InvalidInputError(f"VM {name!r} is clustered: it moves on its cluster volume "
                                    "(--storage shared), its disks are not copied")  # fmt: skip
        await self.owned_here(m, record, "move")
        spec = record.spec
        place(VmDemand(name, spec.memory, spec.config_version), await m.nodes(), host=to,
              exclude={self.node})  # fmt: skip
        return Storage.SHARED


def _role_deletes(m: Membership, uuid: str, name: str) -> list[Op]:
    """Every key of a clustered VM's role (its name too), for one transaction."""
    return [Delete(m.keys.vm_config(uuid)), Delete(m.keys.vm_owner(uuid)),
            Delete(m.keys.vm_want(uuid)), Delete(m.keys.vm_state(uuid)),
            Delete(m.keys.name(name))]  # fmt: skip
