"""Copying a clustered VM's disks into another cluster's volume, on the VM's owner.

``cluster copy-roles --run`` between clusters whose volume ``V`` is not one
directory (:mod:`ferry.host.cluster.copy_roles`) asks each VM's owner in the
source cluster for two phases (wire format
:class:`ferry.peer.cluster.CopyDisksRequest`):

1. ``full``, while the VM runs: one ``blockdev-backup sync: full`` per disk
   into a new qcow2 in the target cluster's volume directory, with a
   non-persistent dirty bitmap ``ferry-copy`` added in the same transaction
   (:class:`ferry.adapters.backup.BlockBackup`, the machinery of replication's
   cycle 0). The boot files are copied too. An off VM is copied whole with
   ``qemu-img convert``.
2. ``final``: ``want`` off in the source's store (so nothing restarts it), the
   guest shut down cleanly as ``vm stop`` does (ACPI; a guest that ignores it
   is frozen and forced off), and before QEMU quits (it stays after the
   guest's power-off: ``-no-shutdown``) ``blockdev-backup sync: incremental``
   of the bitmap into the same targets: only what the guest wrote since the
   full copy, up to its last write. If that copy fails, the VM is off in the
   source with whole disks and ``--run`` says to start it there again. Once
   QEMU is gone, each target gets a persistent bitmap ``ferry-back``
   (``qemu-img bitmap --add``): the QEMU that runs the copy in the target
   cluster records every write in it.
3. ``back`` (``--rollback``, asked of the VM's owner in the target cluster by
   a node of the source, which this node admits from its copy record): the
   same stop and last copy with ``ferry-back``, into the source's disks, so
   only what the VM wrote in the target travels. A VM whose ``ferry-back``
   is gone or inconsistent (restarted after a crash) is refused with one
   line; an off VM is copied back whole with ``qemu-img convert``.

Every phase holds the VM's disk turn, so no replication cycle or move races
them and the reconciler leaves the VM alone. The owner writes the target
directory itself, so it must see the target cluster's volume directory; a
node that does not is refused with one line (streaming the copy to a node
of the target cluster over NBD is not built).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferry.adapters import qemu_img
from ferry.adapters.backup import BlockBackup, Sync
from ferry.adapters.os_errors import os_errors
from ferry.adapters.pki import CertInfo, Role
from ferry.adapters.qemu import QmpChannel
from ferry.core.cluster.copy_roles import CopyRecord, Phase, record_key
from ferry.core.cluster.keys import ClusterKeys
from ferry.core.cluster.roles import Want
from ferry.core.vmstate import is_live
from ferry.errors import (
    AuthError,
    ConflictError,
    FerryError,
    MoveFailedError,
    NotFoundError,
    StorageError,
)
from ferry.host.cluster.volumes import require_node
from ferry.peer import cluster as wire
from ferry.peer.client import Connector, Timeout
from ferry.peer.replication import HELLO, Hello
from ferry.peer.server import Call, PeerServer

if TYPE_CHECKING:
    from ferry.adapters.catalog import VmRecord
    from ferry.host.cluster.membership import ClusterContext, Membership
    from ferry.host.vms.service import VmService

log = logging.getLogger(__name__)

BITMAP = "ferry-copy"
BACK = "ferry-back"  # persistent on the copies: what the VM writes in the target cluster
GRANULARITY = 64 * 1024
TURN = "a copy-roles disk copy"


class DiskCopies:
    """Both sides of a copy-roles disk copy: the owner's answer and the asker's call."""

    def __init__(self, context: ClusterContext, vms: VmService, connector: Connector, *,
                 node: str) -> None:  # fmt: skip
        self.context = context
        self.vms = vms
        self.connector = connector
        self.node = node

    def register(self, server: PeerServer) -> None:
        server.handle(wire.COPY_DISKS, self.answer, guard=self._guard)

    # -- the asking side -------------------------------------------------------------

    async def hello(self, node: str, url: str) -> Hello:
        """What a node of the target cluster runs (CPU models, networks), for the report."""
        async with self.connector.connect(node, url, timeout=Timeout.PROBE) as peer:
            return await peer.call(HELLO)

    async def ask(self, m: Membership, owner: str, url: str, body: wire.CopyDisksRequest, *,
                  cluster: str | None = None) -> wire.CopyDisksReply:  # fmt: skip
        """Run a phase on VM's owner ``owner`` of ``cluster`` (default this node's; this
        node answers itself directly)."""
        if owner == self.node:
            return await self.copy_here(m, body)
        async with self.connector.connect(owner, url, timeout=Timeout.TRANSFER) as peer:
            return await peer.call(wire.COPY_DISKS, body, cluster=cluster or m.cluster)

    # -- the owner's side ------------------------------------------------------------

    def _guard(self, caller: CertInfo, params: dict[str, str]) -> None:
        m = self.context.membership
        if m is None or params.get("cluster") != m.cluster:
            raise AuthError(f"{caller.common_name!r} asked node {self.node} to copy disks of "
                            f"cluster {params.get('cluster')!r}, which this host is not "
                            "in")  # fmt: skip

    async def answer(self, call: Call[wire.CopyDisksRequest]) -> wire.CopyDisksReply:
        m = self.context.membership
        assert m is not None  # the guard saw one
        if call.body.phase == "back":
            await _require_copy_source(call, m)
        else:
            await require_node(call, m)
        return await self.copy_here(m, call.body)

    async def copy_here(self, m: Membership, body: wire.CopyDisksRequest) -> wire.CopyDisksReply:
        record = self.vms.catalog.find(body.vm_uuid)
        if record is None:
            raise NotFoundError(f"VM {body.vm_uuid} is not on node {self.node}")
        if len(body.targets) != len(record.spec.disks):
            raise ValueError(f"{len(record.spec.disks)} disks, {len(body.targets)} targets")
        volume = Path(body.volume_path)
        if not await asyncio.to_thread(volume.is_dir):
            raise StorageError(
                f"node {self.node} does not see the target cluster's volume directory "
                f"{volume}: copy-roles with copied storage needs the source's nodes to see "
                "it (mount it there), or move the VMs with 'ferry vm move VM --to-cluster'"
            )
        targets = [Path(t) for t in body.targets]
        started = time.monotonic()
        async with self.vms.turns.turn(record.uuid, TURN):
            record = self.vms.catalog.get(record.uuid)
            if body.phase == "full":
                copied = await self._full(record, targets, body.files)
                took = round(time.monotonic() - started, 3)
                return wire.CopyDisksReply(node=self.node, bytes=copied, seconds=took)
            if body.phase == "back":
                stopped_at, copied = await self._back(m, record, targets)
            else:
                stopped_at, copied = await self._final(m, record, targets)
                for target in targets:  # from here on, what changes in the target cluster
                    await qemu_img.add_bitmap(target, BACK, granularity=GRANULARITY)
        return wire.CopyDisksReply(node=self.node, bytes=copied, stopped_at=stopped_at,
                                   seconds=round(time.monotonic() - started, 3))  # fmt: skip

    async def _full(self, record: VmRecord, targets: Sequence[Path],
                    files: dict[str, str]) -> int:  # fmt: skip
        for target in targets:
            with os_errors(f"node {self.node} cannot make {target.parent}"):
                await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
        for src, dst in files.items():
            with os_errors(f"node {self.node} cannot copy {src} to {dst}"):
                await asyncio.to_thread(shutil.copyfile, src, dst)
        if not is_live(record.state):
            for disk, target in zip(record.spec.disks, targets, strict=True):
                await qemu_img.convert_to_qcow2(Path(disk.path), target, src_format=disk.format)
            return sum(_allocated(t) for t in targets)
        channel = self.vms.channel(record)
        await _drop_bitmap(channel, len(targets))  # a failed earlier --run leaves one
        for disk, target in zip(record.spec.disks, targets, strict=True):
            await qemu_img.create(target, disk.size)
        added = [{"type": "block-dirty-bitmap-add",
                  "data": {"node": f"disk{i}", "name": BITMAP, "persistent": False,
                           "granularity": GRANULARITY}}
                 for i in range(len(targets))]  # fmt: skip
        copied = [0]
        await self._backup(record, "full").run(
            targets, sync=Sync.FULL, also=added, progress=lambda n: copied.__setitem__(0, n)
        )
        log.info("VM %s: full copy of %d disk(s) into %s: %d bytes", record.name,
                 len(targets), targets[0].parent, copied[0])  # fmt: skip
        return copied[0]

    async def _back(self, m: Membership, record: VmRecord,
                    targets: Sequence[Path]) -> tuple[float, int]:  # fmt: skip
        """``--rollback``: stop it and copy what it wrote here since ``--run`` (``ferry-back``)
        into the source's disks; an off VM is copied back whole."""
        missing = [t for t in targets if not await asyncio.to_thread(t.is_file)]
        if missing:
            raise NotFoundError(f"VM {record.name!r}: its disk {missing[0]} in the source "
                                "cluster is gone: nothing to copy the changes onto, nothing "
                                "rolled back")  # fmt: skip
        if not is_live(record.state):
            await m.store.put(m.keys.vm_want(record.uuid), Want.OFF.value.encode())
            stopped_at = time.time()
            for disk, target in zip(record.spec.disks, targets, strict=True):
                await qemu_img.convert_to_qcow2(Path(disk.path), target, src_format=disk.format)
            return stopped_at, sum(_allocated(t) for t in targets)
        if not await _bitmap_usable(self.vms.channel(record), len(targets), BACK):
            raise ConflictError(
                f"VM {record.name!r} lost its record of what it wrote since --run (it was "
                "restarted after a crash): nothing rolled back; copy it back with "
                "'ferry cluster copy-roles' the other way"
            )
        return await self._final(m, record, targets, bitmap=BACK)

    async def _final(self, m: Membership, record: VmRecord, targets: Sequence[Path], *,
                     bitmap: str = BITMAP) -> tuple[float, int]:  # fmt: skip
        """Stop it cleanly and copy what ``bitmap`` marks; (stop asked, bytes)."""
        await m.store.put(m.keys.vm_want(record.uuid), Want.OFF.value.encode())
        stopped_at = time.time()
        if not is_live(record.state):
            return stopped_at, 0
        copied = [0]
        failed: list[FerryError] = []

        async def last_copy(channel: QmpChannel, forced: bool) -> None:
            # The guest is down and QEMU still holds the disks (-no-shutdown); a guest
            # that ignored the power-down is frozen for the copy, then forced off.
            try:
                if forced:
                    await channel.execute("stop")
                await self._backup(record, "final", channel).run(
                    targets, sync=Sync.INCREMENTAL, bitmap=bitmap,
                    progress=lambda n: copied.__setitem__(0, n))  # fmt: skip
            except FerryError as exc:
                failed.append(exc)  # QEMU ends anyway; the copy is refused below

        _, forced = await self.vms.stop(record.name, before_quit=last_copy)
        if failed:
            raise MoveFailedError(f"VM {record.name!r}: the copy of its last changes failed "
                                  f"({failed[0]}); it is off in the source, whose disks are "
                                  "whole: start it there again")  # fmt: skip
        log.info("VM %s: stopped (%s), final delta of %d bytes copied", record.name,
                 "forced" if forced else "clean", copied[0])  # fmt: skip
        return stopped_at, copied[0]

    def _backup(self, record: VmRecord, phase: str,
                channel: QmpChannel | None = None) -> BlockBackup:  # fmt: skip
        devices = [f"disk{i}" for i in range(len(record.spec.disks))]
        return BlockBackup(
            channel or self.vms.channel(record),
            f"copy-{phase}-{record.uuid[:8]}",
            devices,
            what=f"copy-roles {phase} copy of VM {record.name!r}",
        )


async def _bitmap_usable(channel: QmpChannel, disks: int, name: str) -> bool:
    """Every disk node carries bitmap ``name``, consistent."""
    found: dict[str, bool] = {}
    for device in await channel.execute("query-block"):
        inserted = device.get("inserted") or {}
        for bitmap in inserted.get("dirty-bitmaps") or []:
            if bitmap.get("name") == name:
                found[str(inserted.get("node-name"))] = not bitmap.get("inconsistent")
    return all(found.get(f"disk{i}", False) for i in range(disks))


async def _require_copy_source(call: Call[wire.CopyDisksRequest], m: Membership) -> None:
    """``back`` is asked by a node of the cluster this node's copy record of the volume
    names as the source, for a VM of that record that ran here."""
    if call.caller.role is Role.ADMIN:
        return
    caller = call.require_host()
    entry = await m.store.get(record_key(m.keys, call.body.volume))
    record = None if entry is None else CopyRecord.from_json(entry.value)
    if (record is None or record.phase is not Phase.RAN
            or all(vm.uuid != call.body.vm_uuid for vm in record.vms)
            or await m.store.get(ClusterKeys(record.source).member(caller)) is None):  # fmt: skip
        raise AuthError(f"host {caller!r} may not copy VM {call.body.vm_uuid} back: no copy "
                        f"of volume {call.body.volume!r} from its cluster stands in "
                        f"{m.cluster}")  # fmt: skip


async def _drop_bitmap(channel: Any, disks: int) -> None:
    for index in range(disks):
        try:
            await channel.execute("block-dirty-bitmap-remove",
                                  {"node": f"disk{index}", "name": BITMAP})  # fmt: skip
        except FerryError:
            continue  # none there: the usual case


def _allocated(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


def allocated_bytes(paths: Sequence[str]) -> int:
    """What a full copy of these disk files reads, about (their allocated bytes)."""
    return sum(_allocated(Path(p)) for p in paths)
