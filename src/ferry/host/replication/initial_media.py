"""Initial replication copy on external media: written on the primary, imported on the replica.

``ferry replication enable VM --initial media:DIR`` takes the full point-in-time
copy into DIR (``base-disk{i}.qcow2``) and writes :data:`MANIFEST` last, so a
folder without it is incomplete. The admin carries DIR to the replica host and
runs ``ferry replication import-initial DIR --host REPLICA``, which treats the
folder as untrusted (plain names, no symlinks, sizes and SHA-256 checksums, the
images' headers) and links it as the relationship's first recovery point. The
primary's next cycle sees the point and sends only what changed since.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ferry.adapters import qemu_img
from ferry.adapters.durable import fsync_dir, fsync_file
from ferry.core.export_format import FileName, ManifestFile
from ferry.core.relationship import PendingPoint, Relationship
from ferry.core.replication import PointInfo
from ferry.core.validation import first_error
from ferry.errors import ConflictError, InvalidInputError
from ferry.host.exchange.service import sha256_file
from ferry.host.replication.chain import BASE, disk_file

if TYPE_CHECKING:
    from ferry.host.replication.receiver import ReplicaStore

log = logging.getLogger(__name__)

MANIFEST = "ferry-initial-copy.json"
FORMAT = "ferry-initial-copy"


class MediaManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str
    version: int
    vm_uuid: str = Field(pattern=r"^[0-9a-f-]{36}$")
    vm_name: str
    primary: str
    point_id: int = Field(ge=0)
    time: float
    files: list[ManifestFile] = Field(min_length=1, max_length=16)
    disks: list[FileName] = Field(min_length=1, max_length=16)


async def write_media(folder: Path, rel: Relationship, point: PendingPoint) -> None:
    files = []
    for raw in point.files:
        path = Path(raw)
        digest = await asyncio.to_thread(sha256_file, path)
        await asyncio.to_thread(fsync_file, path)
        files.append(ManifestFile(path=path.name, size=path.stat().st_size, sha256=digest))
    manifest = MediaManifest(format=FORMAT, version=1, vm_uuid=rel.vm_uuid, vm_name=rel.vm_name,
                             primary=rel.primary, point_id=point.id, time=point.time,
                             files=files, disks=[f.path for f in files])  # fmt: skip
    target = folder / MANIFEST
    target.with_suffix(".partial").write_text(manifest.model_dump_json(indent=2))
    fsync_file(target.with_suffix(".partial"))
    target.with_suffix(".partial").rename(target)
    fsync_dir(folder)


def read_media(folder: Path) -> MediaManifest:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise InvalidInputError(f"{folder} is not a folder")
    if not path.is_file() or path.is_symlink():
        raise InvalidInputError(
            f"{folder} holds no {MANIFEST}: not an initial copy, or an unfinished one"
        )
    try:
        manifest = MediaManifest.model_validate_json(path.read_bytes()[: 1024 * 1024])
    except ValidationError as exc:
        raise InvalidInputError(f"{folder}: malformed {MANIFEST}: {first_error(exc)}") from exc
    if manifest.format != FORMAT or manifest.version != 1:
        raise InvalidInputError(f"{folder}: {MANIFEST} is not format {FORMAT} version 1")
    return manifest


async def import_media(folder: Path, manifest: MediaManifest, targets: list[Path],
                       sizes: list[int]) -> int:  # fmt: skip
    """Check every file, then copy disk ``i`` to ``targets[i]``; returns bytes copied."""
    entries = {f.path: f for f in manifest.files}
    if len(manifest.disks) != len(targets):
        raise InvalidInputError(f"{folder}: {len(manifest.disks)} disks, the replica VM has "
                                f"{len(targets)}")  # fmt: skip
    copied = 0
    for name, target, size in zip(manifest.disks, targets, sizes, strict=True):
        entry = entries.get(name)
        if entry is None:
            raise InvalidInputError(f"{folder}: {name} has no checksum in {MANIFEST}")
        source = folder / name
        info = source.lstat() if source.exists() or source.is_symlink() else None
        if info is None or source.is_symlink() or not source.is_file():
            raise InvalidInputError(f"{folder}: {name} is missing or not a plain file")
        if info.st_size != entry.size:
            raise InvalidInputError(f"{folder}: {name} is {info.st_size} bytes, "
                                    f"the manifest says {entry.size}")  # fmt: skip
        if await asyncio.to_thread(sha256_file, source) != entry.sha256:
            raise InvalidInputError(f"{folder}: {name} does not match its checksum")
        details: dict[str, Any] = await qemu_img.info(source)
        qemu_img.check_self_contained(details, what=f"{folder}/{name}")
        if details.get("format") != "qcow2" or int(details.get("virtual-size", -1)) != size:
            raise InvalidInputError(f"{folder}: {name} is not a qcow2 disk of {size} bytes")
        partial = target.with_name(target.name + ".partial")
        await asyncio.to_thread(shutil.copyfile, source, partial)
        await asyncio.to_thread(fsync_file, partial)
        partial.rename(target)
        copied += entry.size
    fsync_dir(targets[0].parent)
    return copied


def describe(manifest: MediaManifest) -> dict[str, Any]:
    return json.loads(manifest.model_dump_json())  # type: ignore[no-any-return]


async def import_initial(store: ReplicaStore, folder: Path) -> dict[str, Any]:
    """Check ``folder`` and link it as the first recovery point of its replica VM here."""
    manifest = read_media(folder)
    rel = store.relationship(manifest.vm_uuid)
    if rel.primary != manifest.primary:
        raise InvalidInputError(f"{folder} was written by host {manifest.primary!r}; VM "
                                f"{rel.vm_name!r} replicates from {rel.primary!r}")  # fmt: skip
    async with store.lock(rel.vm_uuid):
        if store.catalog.points(rel.vm_uuid):
            raise ConflictError(f"the replica of VM {rel.vm_name!r} already has its "
                                "initial copy")  # fmt: skip
        record = store.catalog.get(rel.vm_uuid)
        storage = Path(rel.storage)
        targets = [disk_file(storage, BASE, i) for i in range(len(record.spec.disks))]
        copied = await import_media(folder, manifest, targets,
                                    [d.size for d in record.spec.disks])  # fmt: skip
        store.chain.link(rel, record, PointInfo(id=manifest.point_id, time=manifest.time,
                                                file=BASE))  # fmt: skip
    log.info("VM %s: initial copy imported from %s (%d bytes)", rel.vm_name, folder, copied)
    return {"vm": rel.vm_name, "point": manifest.point_id, "bytes": copied,
            **store.state(rel.vm_uuid).model_dump()}  # fmt: skip
