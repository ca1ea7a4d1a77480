"""The recovery point chains of this host's replica VMs: linking, retention, listing.

A replica VM's points live in its storage dir as one qcow2 per disk and
point, ``{stem}-disk{i}.qcow2``: ``base`` for the oldest point (a full image),
``p{id}`` for each later one, an overlay on the point before. The catalog
lists the points (``recovery_points``); the replica VM's disks are the latest
point's files.

Crash safety: a point's files are renamed into place before the catalog
lists it (:meth:`RecoveryPointChain.link`), so a crash in between leaves an
unlisted file the resend of that point overwrites. Retention follows
:class:`ferry.core.replication.Merge`, one repeatable step at a time; a merge
cut short leaves the catalog's oldest point with a stem other than ``base``,
and :meth:`RecoveryPointChain.retain` finishes it before anything else.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from ferry.adapters import block_hashes, qemu_img
from ferry.adapters.catalog import Catalog, VmRecord
from ferry.adapters.durable import fsync_file
from ferry.adapters.os_errors import os_errors
from ferry.adapters.point_transfer import apply_merge, apply_thin, delete_point_file
from ferry.core.relationship import Relationship, extension_pin
from ferry.core.replication import (
    Merge,
    PointInfo,
    ReplicationOp,
    ReplicationState,
    Thin,
    is_continuous,
    retention_plan,
    thinning_plan,
    transition,
)
from ferry.core.spec import DiskSpec, VmSpec
from ferry.errors import NotFoundError
from ferry.peer.replication import PointList, PointView

log = logging.getLogger(__name__)

BASE = "base"
# The adopted image of ``--initial existing`` is linked as this id: it is the
# chain's base but not a recovery point of the primary at any instant.
ADOPTED_POINT = -1


def disk_file(storage: Path, stem: str, disk: int) -> Path:
    return storage / f"{stem}-disk{disk}.qcow2"


def stem_size(storage: Path, stem: str, disks: int) -> int:
    """Bytes on disk of one point (every disk's file)."""
    return sum(disk_file(storage, stem, i).stat().st_size for i in range(disks))


def replica_spec(spec: VmSpec, storage: Path, stem: str | None) -> VmSpec:
    """The replica VM's spec when its disks are point ``stem``'s files (None: the base)."""
    disks = [
        DiskSpec(path=str(disk_file(storage, stem or BASE, i)), size=d.size, format="qcow2")
        for i, d in enumerate(spec.disks)
    ]
    return spec.model_copy(update={"disks": tuple(disks)})


class RecoveryPointChain:
    """The chains of every replica VM here, by VM; callers hold the VM's store lock."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def points(self, vm_uuid: str) -> list[PointInfo]:
        """Recovery points offered for failover, oldest first."""
        return [p for p in self.catalog.points(vm_uuid) if p.id != ADOPTED_POINT]

    def views(self, vm_uuid: str, app_consistent: Collection[int] = ()) -> PointList:
        """``replication points --json``, each point as far as it is known consistent.

        Every point is crash-consistent: one QMP transaction cut every disk at
        one instant, and it is linked only once verified whole (``consistent``
        keeps that old meaning). ``app_consistent``: the ids cut while the
        guest's file systems were frozen through its guest agent.
        """
        frozen = set(app_consistent)
        return PointList([PointView(id=p.id, time=p.time, size=p.size, consistent=True,
                                    crash_consistent=True, app_consistent=p.id in frozen)
                          for p in self.points(vm_uuid)])  # fmt: skip

    def link(self, rel: Relationship, record: VmRecord, point: PointInfo) -> Relationship:
        """A point's files are in place: list it, and make it the replica VM's disks.

        The first linked point ends the initial copy, however it came (network,
        media, or the patch over an adopted image).
        """
        storage = Path(rel.storage)
        size = stem_size(storage, point.file, len(record.spec.disks))
        self.catalog.add_point(rel.vm_uuid, PointInfo(point.id, point.time, point.file, size))
        self.catalog.update_spec(replica_spec(record.spec, storage, point.file))
        if rel.state is ReplicationState.INITIAL_COPY:
            rel = rel.model_copy(update={
                "state": transition(rel.state, ReplicationOp.INITIAL_COPY_DONE)})  # fmt: skip
            self.catalog.put_relationship(rel)
        return rel

    async def retain(self, rel: Relationship) -> None:
        """Finish a cut-short merge, then merge down to the kept number of points.

        Points a test failover or a failover runs on, and those the extended
        host still needs as separate overlays, are left alone.
        """
        storage = Path(rel.storage)
        disks = len(self.catalog.get(rel.vm_uuid).spec.disks)
        chain = self.catalog.points(rel.vm_uuid)
        if chain and chain[0].file != BASE:
            # Step 1 of a merge ran (the dropped point is gone from the catalog)
            # and the rest may not have: redo it, every step is repeatable.
            overlay = chain[0]
            after = chain[1] if len(chain) > 1 else None
            gone = PointInfo(id=overlay.id - 1, time=0.0, file=BASE)
            await self._merge(Merge(BASE, gone, overlay, after), storage, disks, rel)
            chain = self.catalog.points(rel.vm_uuid)
        in_use = {p for p in (rel.test_point, rel.failover_point) if p is not None}
        pin = extension_pin(self.catalog.extension(rel.vm_uuid))
        if pin is not None:  # the extended host still needs these as separate overlays
            in_use |= {p.id for p in chain if p.id > pin}
        if is_continuous(rel.frequency_s):
            for thin in thinning_plan(chain, time.time(), in_use=in_use):
                await self._thin(thin, storage, disks, rel)
            chain = self.catalog.points(rel.vm_uuid)
        for merge in retention_plan(chain, rel.recovery_points, in_use=in_use):
            self.catalog.delete_point(rel.vm_uuid, merge.drops.id)
            await self._merge(merge, storage, disks, rel)

    async def _thin(self, thin: Thin, storage: Path, disks: int, rel: Relationship) -> None:
        """Drop a middle point (continuous replication's thinning), see :class:`Thin`."""
        for i in range(disks):
            per_disk = Thin(
                drops=thin.drops,
                onto=PointInfo(thin.onto.id, thin.onto.time,
                               disk_file(storage, thin.onto.file, i).name),
                rebase=PointInfo(thin.rebase.id, thin.rebase.time,
                                 disk_file(storage, thin.rebase.file, i).name),
            )  # fmt: skip
            await apply_thin(per_disk, storage)
        self.catalog.delete_point(rel.vm_uuid, thin.drops.id)
        for i in range(disks):
            await delete_point_file(disk_file(storage, thin.drops.file, i))
        kept = thin.rebase
        size = stem_size(storage, kept.file, disks)
        self.catalog.add_point(rel.vm_uuid, PointInfo(kept.id, kept.time, kept.file, size))
        log.info("VM %s: thinned recovery point %d out", rel.vm_name, thin.drops.id)

    async def _merge(self, merge: Merge, storage: Path, disks: int, rel: Relationship) -> None:
        for i in range(disks):
            if not disk_file(storage, merge.overlay.file, i).exists():
                continue  # this disk's merge already finished before a crash
            per_disk = Merge(
                base_file=disk_file(storage, merge.base_file, i).name,
                drops=merge.drops,
                overlay=PointInfo(merge.overlay.id, merge.overlay.time,
                                  disk_file(storage, merge.overlay.file, i).name),
                rebase=None if merge.rebase is None else PointInfo(
                    merge.rebase.id, merge.rebase.time,
                    disk_file(storage, merge.rebase.file, i).name),
            )  # fmt: skip
            await apply_merge(per_disk, storage)
        size = stem_size(storage, BASE, disks)
        self.catalog.add_point(rel.vm_uuid, PointInfo(id=merge.overlay.id, time=merge.overlay.time,
                                                      file=BASE, size=size))  # fmt: skip
        if merge.rebase is None:  # the latest point now lives in the base
            record = self.catalog.get(rel.vm_uuid)
            self.catalog.update_spec(replica_spec(record.spec, storage, BASE))
        log.info("VM %s: merged recovery point %d into the base", rel.vm_name, merge.overlay.id)

    async def latest_hashes(self, rel: Relationship, block_size: int) -> list[list[str]]:
        """Per-disk block hashes of the latest point (for a resynchronisation)."""
        chain = self.catalog.points(rel.vm_uuid)
        if not chain:
            raise NotFoundError(f"the replica of VM {rel.vm_name!r} has no data yet")
        storage = Path(rel.storage)
        disks = len(self.catalog.get(rel.vm_uuid).spec.disks)
        return [
            await block_hashes.image_block_hashes(
                disk_file(storage, chain[-1].file, i), scratch_dir=storage,
                block_size=block_size)
            for i in range(disks)
        ]  # fmt: skip

    async def adopt(self, ours: VmSpec, spec: VmSpec, storage: Path) -> None:
        """``--initial existing``: the disks of ``ours`` become the base of ``spec``'s chain.

        The VM may run on failover overlays over an older chain in this very
        dir (this host was its replica, failed over, and now serves as the
        initial copy back): its disks read through ``base-disk{i}``. So every
        disk is copied beside the chain first, and only then made the base.
        The base is listed as :data:`ADOPTED_POINT` and becomes the VM's disks.
        """
        bases = [disk_file(storage, BASE, i) for i in range(len(spec.disks))]
        fresh = [base.with_name(f".adopting-{base.name}") for base in bases]
        try:
            for disk, copy in zip(ours.disks, fresh, strict=True):
                await qemu_img.convert_to_qcow2(Path(disk.path), copy, src_format=disk.format)
                await asyncio.to_thread(fsync_file, copy)
        except BaseException:
            for copy in fresh:
                copy.unlink(missing_ok=True)
            raise
        for copy, base in zip(fresh, bases, strict=True):
            copy.replace(base)
        size = stem_size(storage, BASE, len(spec.disks))
        self.catalog.add_point(spec.uuid, PointInfo(id=ADOPTED_POINT, time=0.0, file=BASE,
                                                    size=size))  # fmt: skip
        self.catalog.update_spec(replica_spec(spec, storage, BASE))

    @staticmethod
    def drop_stale(ours: VmSpec, storage: Path) -> None:
        """After :meth:`adopt`: the old files are copies of the base now, so they go.

        That is the VM's disks and, in this dir, whatever is left of an older
        relationship's chain (none exists any more).
        """
        keep = {disk_file(storage, BASE, i).resolve() for i in range(len(ours.disks))}
        stale = [Path(disk.path) for disk in ours.disks]
        stale += storage.glob("*-disk*.qcow2")
        for path in stale:
            if path.resolve() not in keep:
                path.unlink(missing_ok=True)

    async def flatten(self, spec: VmSpec, storage: Path, vm_dir: Path) -> VmSpec:
        """The latest point as one plain qcow2 per disk: the spec of a VM without a chain.

        Its kernel and initrd are copied to ``vm_dir``, so ``vm delete`` finds
        everything it removes. Nothing of the chain is deleted here (see
        :meth:`drop`); on a failure what this made is removed again, the chain
        unchanged (a full disk: :class:`~ferry.errors.StorageFullError`).
        """
        made: list[Path] = []
        try:
            disks = []
            for i, disk in enumerate(spec.disks):
                flat = storage / f"disk{i}.qcow2"
                made.append(flat)
                await qemu_img.convert_to_qcow2(Path(disk.path), flat, src_format="qcow2")
                await asyncio.to_thread(fsync_file, flat)
                disks.append(disk.model_copy(update={"path": str(flat)}))
            update: dict[str, Any] = {"disks": tuple(disks)}
            for kind in ("kernel", "initrd"):
                current = getattr(spec, kind)
                if current and Path(current).parent == storage:
                    made.append(vm_dir / kind)
                    with os_errors(f"cannot copy the {kind} of VM {spec.name!r} to {vm_dir}"):
                        vm_dir.mkdir(parents=True, exist_ok=True)
                        await asyncio.to_thread(shutil.copyfile, current, vm_dir / kind)
                    await asyncio.to_thread(fsync_file, vm_dir / kind)
                    update[kind] = str(vm_dir / kind)
        except BaseException:
            for path in made:
                path.unlink(missing_ok=True)
            raise
        return spec.model_copy(update=update)

    @staticmethod
    def drop(storage: Path, *, keep: VmSpec) -> None:
        """Delete the chain's files, all but the disks of ``keep``."""
        kept = {Path(d.path).name for d in keep.disks}
        for path in storage.glob("*.qcow2"):
            if path.name not in kept:
                path.unlink(missing_ok=True)
        for kind in ("kernel", "initrd"):  # copied to the VM's directory by flatten()
            if getattr(keep, kind) != str(storage / kind):
                (storage / kind).unlink(missing_ok=True)
