"""An OVF appliance on this host, a folder (``NAME.ovf`` beside its files) or an
OVA (one uncompressed tar), read and checked before anything is made of it.

:func:`open_appliance` is the cheap part, done before a job starts: the
descriptor and manifest read and parsed, every OVA member header judged
(:mod:`ferry.core.adopt.ova`), every disk file found inside the appliance
with the size the descriptor gives, the manifest covering the descriptor and
every disk. :meth:`Appliance.stage` is the long part, done by the job: each
disk hashed against the manifest (an OVA's disks are extracted into the new
VM's dir while they are hashed), so a file whose bytes do not match is
refused before anything is registered.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from ferry.core.adopt import ova, ovf
from ferry.core.adopt.ovf import ManifestEntry
from ferry.core.adopt.plan import AdoptedDisk, AdoptionPlan
from ferry.core.adopt.safe_xml import MAX_DOCUMENT
from ferry.errors import InvalidInputError, StorageError

CHUNK = 4 * 1024 * 1024


class _Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def hexdigest(self) -> str: ...


@dataclass(frozen=True)
class ApplianceDisk:
    """Where one planned disk's bytes are: a file of the folder, or an OVA member."""

    disk: AdoptedDisk
    size: int
    path: Path | None = None
    member: str | None = None
    digest: ManifestEntry | None = None


@dataclass(frozen=True)
class Appliance:
    source: Path
    plan: AdoptionPlan
    disks: tuple[ApplianceDisk, ...]
    is_ova: bool

    def stage(self, into: Path, progress: Callable[[int], None]) -> list[Path | None]:
        """Each disk's file, checked against the manifest; an OVA's disks are extracted
        into ``into`` first (blocking: run it in a thread). None: an empty disk."""
        paths: list[Path | None] = []
        members: dict[str, tarfile.TarInfo] = {}
        tar = _open_tar(self.source) if self.is_ova else None
        try:
            if tar is not None:
                members = {m.name: m for m in tar.getmembers()}
            for index, item in enumerate(self.disks):
                if item.disk.source is None:
                    paths.append(None)
                    continue
                digest: _Digest | None = None
                if item.digest is not None:
                    digest = hashlib.new(item.digest.algorithm.lower())
                if tar is not None and item.member is not None:
                    target = into / f"source{index}.{item.disk.format}"
                    handle = tar.extractfile(members[item.member])
                    if handle is None:
                        raise InvalidInputError(f"{self.source}: {item.member} cannot be read")
                    with handle, target.open("xb") as out:
                        written = _copy(handle, out, digest, progress)
                    paths.append(target)
                else:
                    assert item.path is not None
                    with _open_plain(item.path) as handle:
                        written = _copy(handle, None, digest, progress)
                    paths.append(item.path)
                name = item.disk.source
                if written != item.size:
                    raise InvalidInputError(
                        f"{self.source}: {name} changed while it was read "
                        f"({written} bytes, not {item.size})"
                    )
                if item.digest and digest and digest.hexdigest() != item.digest.digest:
                    raise InvalidInputError(
                        f"{self.source}: {name} does not match its {item.digest.algorithm} "
                        "checksum in the manifest (damaged or altered); nothing was adopted"
                    )
        except OSError as exc:
            raise StorageError(f"cannot read appliance {self.source}: {exc.strerror}") from exc
        finally:
            if tar is not None:
                tar.close()
        return paths


def open_appliance(source: Path) -> Appliance:
    """Read and check ``source`` (``.ovf`` in a folder, or ``.ova``) up to the disk bytes."""
    try:
        if source.suffix.lower() == ".ova":
            return _open_ova(source)
        if source.suffix.lower() == ".ovf":
            return _open_folder(source)
    except OSError as exc:
        raise StorageError(f"cannot read appliance {source}: {exc.strerror}") from exc
    raise InvalidInputError(f"{source} is neither an .ovf descriptor nor an .ova archive")


def _open_folder(descriptor: Path) -> Appliance:
    folder = descriptor.parent
    data = _read_small(descriptor)
    plan = ovf.parse_envelope(data, what=str(descriptor))
    manifest_path = descriptor.with_suffix(".mf")
    manifest = None
    if manifest_path.exists():
        manifest = ovf.parse_manifest(_read_small(manifest_path), what=str(manifest_path))
    plan = _check_manifest(plan, manifest, descriptor.name, data, what=str(descriptor))
    if descriptor.with_suffix(".cert").exists():
        plan = plan.noted(_CERT_NOTE)
    disks = []
    root = folder.resolve()
    for disk in plan.disks:
        if disk.source is None:
            disks.append(ApplianceDisk(disk=disk, size=0))
            continue
        path = folder / disk.source
        info = _plain_file(path, root, what=f"{descriptor}: disk {disk.source}")
        _check_size(disk, info.st_size, what=str(descriptor))
        entry = manifest.get(disk.source) if manifest else None
        disks.append(ApplianceDisk(disk=disk, size=info.st_size, path=path, digest=entry))
    return Appliance(source=descriptor, plan=plan, disks=tuple(disks), is_ova=False)


def _open_ova(source: Path) -> Appliance:
    with _open_tar(source) as tar:
        entries = [_entry(member) for member in tar.getmembers()]
        files = ova.check_entries(entries, what=str(source))
        name = ova.descriptor(files, what=str(source))
        data = _member_bytes(tar, name, source)
        plan = ovf.parse_envelope(data, what=f"{source}: {name}")
        manifest_name = ova.manifest_name(files, name)
        manifest = None
        if manifest_name is not None:
            manifest = ovf.parse_manifest(
                _member_bytes(tar, manifest_name, source), what=f"{source}: {manifest_name}"
            )
    plan = _check_manifest(plan, manifest, name, data, what=str(source))
    if name[: -len(".ovf")] + ".cert" in files:
        plan = plan.noted(_CERT_NOTE)
    disks = []
    for disk in plan.disks:
        if disk.source is None:
            disks.append(ApplianceDisk(disk=disk, size=0))
            continue
        if disk.source not in files:
            raise InvalidInputError(f"{source}: disk {disk.source} is not in the archive")
        size = files[disk.source].size
        _check_size(disk, size, what=str(source))
        entry = manifest.get(disk.source) if manifest else None
        disks.append(ApplianceDisk(disk=disk, size=size, member=disk.source, digest=entry))
    return Appliance(source=source, plan=plan, disks=tuple(disks), is_ova=True)


_CERT_NOTE = (
    "its signing certificate (.cert) is not checked: ferry checks the manifest's "
    "checksums, not who signed them"
)


def _check_manifest(
    plan: AdoptionPlan,
    manifest: dict[str, ManifestEntry] | None,
    descriptor: str,
    data: bytes,
    *,
    what: str,
) -> AdoptionPlan:
    """The manifest covers the descriptor and every disk, and the descriptor matches it."""
    if manifest is None:
        return plan.noted(
            "the appliance has no manifest (.mf): no checksums were checked, only sizes"
        )
    wanted = [descriptor] + [d.source for d in plan.disks if d.source is not None]
    for name in wanted:
        if name not in manifest:
            raise InvalidInputError(
                f"{what}: the manifest has no checksum of {name}; refused "
                "(a manifest must cover every file)"
            )
    entry = manifest[descriptor]
    if hashlib.new(entry.algorithm.lower(), data).hexdigest() != entry.digest:
        raise InvalidInputError(
            f"{what}: {descriptor} does not match its {entry.algorithm} "
            "checksum in the manifest (damaged or altered)"
        )
    return plan


def _check_size(disk: AdoptedDisk, size: int, *, what: str) -> None:
    if disk.file_size is not None and disk.file_size != size:
        raise InvalidInputError(
            f"{what}: disk {disk.source} is {size} bytes, the descriptor says {disk.file_size}"
        )


def _plain_file(path: Path, root: Path, *, what: str) -> os.stat_result:
    """``path``'s stat if it is a regular file that really lies inside ``root``."""
    if not path.resolve().is_relative_to(root):
        raise InvalidInputError(f"{what} lies outside the appliance's folder; refused")
    try:
        info = path.lstat()
    except FileNotFoundError:
        raise InvalidInputError(f"{what} is missing") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
        raise InvalidInputError(f"{what} is not a regular file (a symlink or special file)")
    return info


def _open_plain(path: Path) -> IO[bytes]:
    """Open without following a symlink put there since the check."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    return os.fdopen(fd, "rb")


def _read_small(path: Path) -> bytes:
    with path.open("rb") as handle:
        data = handle.read(MAX_DOCUMENT + 1)
    return data


def _open_tar(source: Path) -> tarfile.TarFile:
    try:
        # "r:" only: an OVA is an uncompressed tar (OVF 1.0 section 5.3).
        return tarfile.open(source, "r:")
    except tarfile.TarError as exc:
        raise InvalidInputError(f"{source} is not an OVA (an uncompressed tar): {exc}") from None


def _entry(member: tarfile.TarInfo) -> ova.TarEntry:
    kind: ova.EntryKind
    if member.issym():
        kind = "symlink"
    elif member.islnk():
        kind = "hardlink"
    elif member.isdir():
        kind = "dir"
    elif member.isreg():
        kind = "file"
    else:
        kind = "other"
    return ova.TarEntry(name=member.name, kind=kind, size=member.size, link=member.linkname)


def _member_bytes(tar: tarfile.TarFile, name: str, source: Path) -> bytes:
    handle = tar.extractfile(name)
    if handle is None:
        raise InvalidInputError(f"{source}: {name} cannot be read")
    with handle:
        return handle.read(MAX_DOCUMENT + 1)


def _copy(
    handle: IO[bytes],
    out: IO[bytes] | None,
    digest: _Digest | None,
    progress: Callable[[int], None],
) -> int:
    written = 0
    while chunk := handle.read(CHUNK):
        if digest is not None:
            digest.update(chunk)
        if out is not None:
            out.write(chunk)
        written += len(chunk)
        progress(len(chunk))
    return written
