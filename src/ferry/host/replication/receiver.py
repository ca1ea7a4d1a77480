"""The replica side of replication: accept a VM, link recovery points, keep retention.

A primary host offers a VM (``POST /v1/peer/replicas``); once the replica
server admits the primary, this records the VM as a stopped ``replica`` VM and
a :class:`~ferry.core.relationship.Relationship` pinning the primary's
certificate. Every recovery point then arrives as a delta stream
(:mod:`ferry.adapters.point_transfer`) and is linked as
``{storage}/{stem}-disk{i}.qcow2``: ``base`` for the oldest point, ``p{id}``
for the others, each an overlay on the one before. The replica VM's disks are
the latest point's files.

Crash safety: a point is renamed into place before the catalog lists it, so a
crash in between leaves an unlisted file that the resend of the same point
overwrites. Retention follows :class:`ferry.core.replication.Merge`; a merge
cut short leaves the catalog's oldest point with a stem other than ``base``,
and :meth:`ReplicaStore._retain` finishes it before anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import UUID

from ferry import __version__
from ferry.adapters import block_hashes, qemu_img
from ferry.adapters.catalog import Catalog, VmRecord
from ferry.adapters.durable import fsync_file
from ferry.adapters.pki import CertInfo, Role
from ferry.adapters.point_transfer import PointReceiver, apply_merge, receive_point
from ferry.core.relationship import InitialMethod, Relationship, extension_pin
from ferry.core.relationship import Role as RelRole
from ferry.core.replication import (
    Merge,
    PointInfo,
    ReplicationOp,
    ReplicationState,
    check_frequency,
    check_recovery_points,
    check_replica_accepts,
    format_frequency,
    retention_plan,
    transition,
)
from ferry.core.spec import DiskSpec, VmSpec
from ferry.core.versions import check_host_runs
from ferry.core.vmstate import VmOp, VmState
from ferry.errors import (
    AuthError,
    ConflictError,
    FerryError,
    InvalidInputError,
    NotFoundError,
    StateError,
)
from ferry.host.config import HostConfig
from ferry.host.replication.server import ReplicaServer
from ferry.host.vms.states import VmStates

log = logging.getLogger(__name__)

BASE = "base"
# The adopted image of ``--initial existing`` is linked as this id: it is the
# chain's base but not a recovery point of the primary at any instant.
ADOPTED_POINT = -1


def disk_file(storage: Path, stem: str, disk: int) -> Path:
    return storage / f"{stem}-disk{disk}.qcow2"


class ReplicaStore:
    """This host's replica VMs and their recovery point chains."""

    def __init__(self, config: HostConfig, catalog: Catalog, server: ReplicaServer) -> None:
        self.config = config
        self.catalog = catalog
        self.states = VmStates(catalog)  # the replica VMs' states change only through it
        self.server = server
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def lock(self, vm_uuid: str) -> asyncio.Lock:
        return self._locks[vm_uuid]

    async def retain(self, vm_uuid: str) -> None:
        async with self._locks[vm_uuid]:
            await self._retain(self.relationship(vm_uuid))

    # -- reading ---------------------------------------------------------------

    def relationship(self, vm_uuid: str) -> Relationship:
        rel = self.catalog.relationship(vm_uuid)
        if rel is None or rel.role is not RelRole.REPLICA:
            raise NotFoundError(
                f"host {self.config.name!r} holds no replica of VM {vm_uuid}; "
                "if the replica VM moved, point the primary at its new host with "
                "'ferry replication set VM --replica HOST'"
            )
        return rel

    def replica_of(self, name: str, *, commands: str) -> tuple[VmRecord, Relationship]:
        """VM ``name`` here and its replica relationship (admin commands by name).

        ``commands`` says what must run against the replica host instead.
        """
        record = self.catalog.find(name)
        if record is None:
            raise NotFoundError(f"no VM named {name!r} on host {self.config.name!r}")
        rel = self.catalog.relationship(record.uuid)
        if rel is None or rel.role is not RelRole.REPLICA:
            raise NotFoundError(f"VM {name!r} on host {self.config.name!r} is not a replica; "
                                f"run {commands} against the replica host (--host)")  # fmt: skip
        return record, rel

    def check_primary(self, caller: CertInfo, rel: Relationship) -> None:
        if caller.role is Role.ADMIN:
            return
        if caller.thumbprint != rel.thumbprint:
            raise AuthError(
                f"host {caller.common_name!r} is not the primary of VM {rel.vm_name!r} "
                f"(that is {rel.primary!r} with certificate thumbprint {rel.thumbprint[:16]}...)"
            )

    def points(self, vm_uuid: str) -> list[PointInfo]:
        """Recovery points offered for failover, oldest first."""
        return [p for p in self.catalog.points(vm_uuid) if p.id != ADOPTED_POINT]

    def point_views(self, vm_uuid: str) -> list[dict[str, Any]]:
        """``replication points --json``: every point is whole (linked only once verified)."""
        return [{"id": p.id, "time": p.time, "size": p.size, "consistent": True}
                for p in self.points(vm_uuid)]  # fmt: skip

    def state(self, vm_uuid: str) -> dict[str, Any]:
        rel = self.relationship(vm_uuid)
        chain = self.catalog.points(vm_uuid)
        points = [p for p in chain if p.id != ADOPTED_POINT]
        return {
            "vm": rel.vm_name,
            "host": self.config.name,
            "version": __version__,
            "functional_level": self.config.functional_level,
            "primary": rel.primary,
            "origin": rel.origin,
            "latest_point": chain[-1].id if chain else None,
            "latest_time": points[-1].time if points else None,
            "points": len(points),
            "recovery_points": rel.recovery_points,
            "bytes": sum(p.size for p in chain),
        }

    # -- accepting a VM ----------------------------------------------------------

    async def accept(self, caller: CertInfo, offer: dict[str, Any]) -> dict[str, Any]:
        """A primary offers VM ``offer["spec"]``: admit it and record the replica VM."""
        if caller.role is not Role.HOST:
            raise AuthError("only a ferry host can be a primary")
        admission = self.server.admit(caller.common_name)
        try:
            spec = VmSpec.model_validate(offer["spec"])
            frequency = check_frequency(int(offer["frequency_s"]))
            keep = check_recovery_points(int(offer["recovery_points"]))
            primary_level = int(offer["functional_level"])
            initial = InitialMethod(offer.get("initial", "network"))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"invalid replica offer: {exc}") from exc
        check_replica_accepts(primary_level, self.config.functional_level,
                              primary=caller.common_name, replica=self.config.name,
                              vm=spec.name)  # fmt: skip
        check_host_runs(spec.config_version, self.config.functional_level,
                        host=self.config.name, vm=spec.name)  # fmt: skip
        async with self._locks[spec.uuid]:
            existing = self.catalog.relationship(spec.uuid)
            if existing is not None:
                if existing.role is RelRole.REPLICA and existing.thumbprint == caller.thumbprint:
                    return self.state(spec.uuid)  # the offer's reply was lost; same primary
                raise ConflictError(
                    f"host {self.config.name!r} already has a replication relationship for "
                    f"VM {spec.name!r} (from {existing.primary!r})"
                )
            storage = Path(admission.storage) / spec.uuid
            record = self.catalog.find(spec.uuid)
            adopt = initial is InitialMethod.EXISTING
            if adopt and (record is None or record.uuid != spec.uuid):
                raise NotFoundError(
                    f"--initial existing: host {self.config.name!r} has no VM with the UUID of "
                    f"{spec.name!r} ({spec.uuid}); import or copy it there first, or use "
                    "--initial network"
                )
            if not adopt and self.catalog.find(spec.name) is not None:
                raise ConflictError(
                    f"host {self.config.name!r} already has a VM named {spec.name!r}; "
                    "use --initial existing if it is a copy of this VM"
                )
            storage.mkdir(parents=True, exist_ok=True)
            rel = Relationship(
                vm_uuid=spec.uuid, vm_name=spec.name, role=RelRole.REPLICA,
                primary=caller.common_name, replica=self.config.name,
                frequency_s=frequency, recovery_points=keep, initial=initial,
                thumbprint=caller.thumbprint, created=time.time(), storage=str(storage),
                primary_url=str(offer.get("primary_url") or ""),
                origin=str(offer.get("origin") or ""),
                origin_url=str(offer.get("origin_url") or ""),
            )  # fmt: skip
            if adopt:
                assert record is not None
                await self._adopt(record, spec, storage)
            else:
                self.catalog.add_vm(self.replica_spec(spec, storage, stem=None), VmState.REPLICA)
            self.catalog.put_relationship(rel)
        log.info("replica of VM %s from %s accepted into %s (%s)", spec.name,
                 caller.common_name, storage, admission.rule)  # fmt: skip
        return self.state(spec.uuid)

    def replica_spec(self, spec: VmSpec, storage: Path, stem: str | None) -> VmSpec:
        disks = [
            DiskSpec(path=str(disk_file(storage, stem or BASE, i)), size=d.size, format="qcow2")
            for i, d in enumerate(spec.disks)
        ]
        return spec.model_copy(update={"disks": tuple(disks)})

    async def _adopt(self, record: VmRecord, spec: VmSpec, storage: Path) -> None:
        """``--initial existing``: the VM already here becomes the chain's base."""
        if record.state not in (VmState.OFF, VmState.CRASHED):
            raise ConflictError(
                f"VM {record.name!r} on host {self.config.name!r} is {record.state.value}; "
                "stop it before it can serve as the initial copy"
            )
        if len(record.spec.disks) != len(spec.disks):
            raise ConflictError(f"VM {record.name!r} here has {len(record.spec.disks)} disks, "
                                f"the primary's has {len(spec.disks)}")  # fmt: skip
        for i, (ours, theirs) in enumerate(zip(record.spec.disks, spec.disks, strict=True)):
            if ours.size != theirs.size:
                raise ConflictError(f"disk {i} of VM {record.name!r} here is {ours.size} bytes, "
                                    f"the primary's {theirs.size}")  # fmt: skip
        for i, disk in enumerate(record.spec.disks):
            target = disk_file(storage, BASE, i)
            await qemu_img.convert_to_qcow2(Path(disk.path), target, src_format=disk.format)
            await asyncio.to_thread(fsync_file, target)
        size = self._stem_size(storage, BASE, len(spec.disks))
        self.catalog.add_point(spec.uuid, PointInfo(id=ADOPTED_POINT, time=0.0, file=BASE,
                                                    size=size))  # fmt: skip
        self.catalog.update_spec(self.replica_spec(spec, storage, BASE))
        self.states.apply(spec.uuid, VmOp.MAKE_REPLICA)
        for disk in record.spec.disks:  # the old files are now copies of the base
            if Path(disk.path).resolve() != disk_file(storage, BASE, 0).resolve():
                Path(disk.path).unlink(missing_ok=True)

    @staticmethod
    def _stem_size(storage: Path, stem: str, disks: int) -> int:
        return sum(disk_file(storage, stem, i).stat().st_size for i in range(disks))

    # -- recovery points -----------------------------------------------------------

    async def receive(self, caller: CertInfo, vm_uuid: str, point_id: int, point_time: float,
                      stream: AsyncIterator[bytes]) -> dict[str, Any]:  # fmt: skip
        """Link one recovery point streamed by the primary; idempotent per id."""
        rel = self.relationship(vm_uuid)
        self.check_primary(caller, rel)
        async with self._locks[vm_uuid]:
            rel = self.relationship(vm_uuid)
            if rel.state is ReplicationState.FAILED_OVER:
                raise StateError(
                    f"VM {rel.vm_name!r} failed over to host {self.config.name!r}; it takes no "
                    "recovery points until the failover is cancelled or reversed"
                )
            chain = self.catalog.points(vm_uuid)
            if chain and point_id <= chain[-1].id:
                async for _ in stream:  # a resend after a lost reply: already linked
                    pass
                return {"point": point_id, "linked": False, **self.state(vm_uuid)}
            record = self.catalog.get(vm_uuid)
            storage = Path(rel.storage)
            disks = len(record.spec.disks)
            stem = f"p{point_id}" if chain else BASE
            targets = [disk_file(storage, stem, i) for i in range(disks)]
            backings: list[Path | None] = (
                [disk_file(storage, chain[-1].file, i) for i in range(disks)]
                if chain else [None] * disks
            )  # fmt: skip
            receiver = PointReceiver(targets, vm_uuid=UUID(vm_uuid), point_id=point_id)
            end = await receive_point(stream, receiver, backings)
            rel = self._linked(rel, record, PointInfo(id=point_id, time=point_time, file=stem))
            log.info("VM %s: linked recovery point %d (%d bytes of stream)", rel.vm_name,
                     point_id, end.wire_bytes)  # fmt: skip
            await self._retain(rel)
        return {"point": point_id, "linked": True, **self.state(vm_uuid)}

    def _linked(self, rel: Relationship, record: VmRecord, point: PointInfo) -> Relationship:
        """A point's files are in place: list it, and make it the replica VM's disks.

        The first linked point ends the initial copy, however it came (network,
        media, or the patch over an adopted image).
        """
        storage = Path(rel.storage)
        size = self._stem_size(storage, point.file, len(record.spec.disks))
        self.catalog.add_point(rel.vm_uuid, PointInfo(point.id, point.time, point.file, size))
        self.catalog.update_spec(self.replica_spec(record.spec, storage, point.file))
        if rel.state is ReplicationState.INITIAL_COPY:
            rel = rel.model_copy(update={
                "state": transition(rel.state, ReplicationOp.INITIAL_COPY_DONE)})  # fmt: skip
            self.catalog.put_relationship(rel)
        return rel

    async def _retain(self, rel: Relationship) -> None:
        """Finish a cut-short merge, then merge down to the kept number of points."""
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
        for merge in retention_plan(chain, rel.recovery_points, in_use=in_use):
            self.catalog.delete_point(rel.vm_uuid, merge.drops.id)
            await self._merge(merge, storage, disks, rel)

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
        size = self._stem_size(storage, BASE, disks)
        self.catalog.add_point(rel.vm_uuid, PointInfo(id=merge.overlay.id, time=merge.overlay.time,
                                                      file=BASE, size=size))  # fmt: skip
        if merge.rebase is None:  # the latest point now lives in the base
            record = self.catalog.get(rel.vm_uuid)
            self.catalog.update_spec(self.replica_spec(record.spec, storage, BASE))
        log.info("VM %s: merged recovery point %d into the base", rel.vm_name, merge.overlay.id)

    async def block_hashes(self, caller: CertInfo, vm_uuid: str,
                           block_size: int) -> list[list[str]]:  # fmt: skip
        """Per-disk block hashes of the latest point (for a resynchronisation)."""
        rel = self.relationship(vm_uuid)
        self.check_primary(caller, rel)
        async with self._locks[vm_uuid]:
            chain = self.catalog.points(vm_uuid)
            if not chain:
                raise NotFoundError(f"the replica of VM {rel.vm_name!r} has no data yet")
            storage = Path(rel.storage)
            disks = len(self.catalog.get(vm_uuid).spec.disks)
            return [
                await block_hashes.image_block_hashes(
                    disk_file(storage, chain[-1].file, i), scratch_dir=storage,
                    block_size=block_size)
                for i in range(disks)
            ]  # fmt: skip

    async def receive_file(self, caller: CertInfo, vm_uuid: str, kind: str,
                           stream: AsyncIterator[bytes]) -> dict[str, Any]:  # fmt: skip
        """The VM's kernel or initrd, kept next to its chain."""
        rel = self.relationship(vm_uuid)
        self.check_primary(caller, rel)
        if kind not in ("kernel", "initrd"):
            raise InvalidInputError(f"unknown VM file {kind!r}")
        target = Path(rel.storage) / kind
        partial = target.with_name(kind + ".partial")
        with partial.open("wb") as out:
            async for chunk in stream:
                out.write(chunk)
        await asyncio.to_thread(fsync_file, partial)
        partial.rename(target)
        record = self.catalog.get(vm_uuid)
        self.catalog.update_spec(record.spec.model_copy(update={kind: str(target)}))
        return {"received": kind}

    async def import_initial(self, folder: Path) -> dict[str, Any]:
        """``replication import-initial DIR``: link an initial copy carried on media."""
        from ferry.host.replication.initial_media import import_media, read_media

        manifest = read_media(folder)
        rel = self.relationship(manifest.vm_uuid)
        if rel.primary != manifest.primary:
            raise InvalidInputError(f"{folder} was written by host {manifest.primary!r}; VM "
                                    f"{rel.vm_name!r} replicates from {rel.primary!r}")  # fmt: skip
        async with self._locks[rel.vm_uuid]:
            if self.catalog.points(rel.vm_uuid):
                raise ConflictError(f"the replica of VM {rel.vm_name!r} already has its "
                                    "initial copy")  # fmt: skip
            record = self.catalog.get(rel.vm_uuid)
            storage = Path(rel.storage)
            disks = len(record.spec.disks)
            targets = [disk_file(storage, BASE, i) for i in range(disks)]
            copied = await import_media(folder, manifest, targets,
                                        [d.size for d in record.spec.disks])  # fmt: skip
            self._linked(rel, record, PointInfo(id=manifest.point_id, time=manifest.time,
                                                file=BASE))  # fmt: skip
        log.info("VM %s: initial copy imported from %s (%d bytes)", rel.vm_name, folder, copied)
        return {"vm": rel.vm_name, "point": manifest.point_id, "bytes": copied,
                **self.state(rel.vm_uuid)}  # fmt: skip

    # -- changing and ending ---------------------------------------------------------

    def update(self, caller: CertInfo, vm_uuid: str, changes: dict[str, Any]) -> dict[str, Any]:
        rel = self.relationship(vm_uuid)
        self.check_primary(caller, rel)
        update: dict[str, Any] = {}
        if changes.get("frequency_s") is not None:
            update["frequency_s"] = check_frequency(int(changes["frequency_s"]))
            extension = self.catalog.extension(vm_uuid)
            if extension is not None and update["frequency_s"] > extension.frequency_s:
                raise InvalidInputError(
                    f"VM {rel.vm_name!r} is extended from {self.config.name!r} to "
                    f"{extension.host!r} every {format_frequency(extension.frequency_s)}; "
                    "replicating it less often than that breaks the extension's rule (run "
                    f"'ferry replication extend {rel.vm_name} --remove --host "
                    f"{self.config.name}' first)"
                )
        if changes.get("recovery_points") is not None:
            update["recovery_points"] = check_recovery_points(int(changes["recovery_points"]))
        if changes.get("primary") and changes.get("thumbprint"):
            # A handover: the VM moved to another primary host.
            update["primary"] = str(changes["primary"])
            update["thumbprint"] = str(changes["thumbprint"])
            update["primary_url"] = str(changes.get("primary_url") or "")
        if changes.get("origin"):  # an extended replica: the VM's primary moved
            update["origin"] = str(changes["origin"])
            update["origin_url"] = str(changes.get("origin_url") or "")
        self.catalog.put_relationship(rel.model_copy(update=update))
        return self.state(vm_uuid)

    async def remove(self, caller: CertInfo, vm_uuid: str) -> dict[str, Any]:
        """End the relationship; the replica VM stays, as an off VM on its latest point."""
        rel = self.relationship(vm_uuid)
        self.check_primary(caller, rel)
        async with self._locks[vm_uuid]:
            record = self.catalog.get(vm_uuid)
            kept = bool(self.catalog.points(vm_uuid))
            self.catalog.delete_relationship(vm_uuid)
            if kept:
                await self._flatten(record, Path(rel.storage))
            else:
                self.catalog.delete(vm_uuid)
                with contextlib.suppress(OSError):
                    shutil.rmtree(rel.storage)
        log.info("replication of VM %s removed; replica VM %s", record.name,
                 "kept" if kept else "deleted (it had no data)")  # fmt: skip
        return {"vm": record.name, "kept_replica_vm": kept}

    async def _flatten(self, record: VmRecord, storage: Path) -> None:
        """The latest point becomes one plain qcow2 per disk; the chain goes.

        The VM is then an ordinary off VM whose disks ``vm delete`` removes.
        The catalog switches to the new files before the chain is deleted, so
        a crash in between leaves only unused chain files behind.
        """
        disks = []
        for i, disk in enumerate(record.spec.disks):
            flat = storage / f"disk{i}.qcow2"
            await qemu_img.convert_to_qcow2(Path(disk.path), flat, src_format="qcow2")
            await asyncio.to_thread(fsync_file, flat)
            disks.append(disk.model_copy(update={"path": str(flat)}))
        update: dict[str, Any] = {"disks": tuple(disks)}
        vm_dir = self.config.data_dir / "vms" / record.uuid  # where VmService keeps its files
        for kind in ("kernel", "initrd"):
            current = getattr(record.spec, kind)
            if current and Path(current).parent == storage:
                vm_dir.mkdir(parents=True, exist_ok=True)
                shutil.move(current, vm_dir / kind)
                update[kind] = str(vm_dir / kind)
        self.catalog.update_spec(record.spec.model_copy(update=update))
        self.states.apply(record, VmOp.RELEASE)
        keep = {Path(d.path).name for d in disks}
        for path in storage.glob("*.qcow2"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def clean_partials(self) -> None:
        """On agent start: drop half-received points (their primaries resend them)."""
        for rel in self.catalog.relationships():
            if rel.role is RelRole.REPLICA and rel.state is not ReplicationState.REMOVED:
                for partial in Path(rel.storage).glob("*.partial"):
                    partial.unlink(missing_ok=True)

    async def recover(self) -> None:
        self.clean_partials()
        for rel in self.catalog.relationships():
            if rel.role is RelRole.REPLICA:
                try:
                    async with self._locks[rel.vm_uuid]:
                        await self._retain(rel)
                except FerryError as exc:
                    log.error("VM %s: cannot finish retention: %s", rel.vm_name, exc)
