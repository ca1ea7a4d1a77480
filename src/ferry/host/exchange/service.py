"""Export a VM as a self-contained folder, and import one (an untrusted folder).

Both are jobs with progress. An export is built as a hidden ``.partial``
sibling and renamed into place only when its manifest is written, so an
interrupted export never leaves a folder that looks complete. An import trusts
nothing in the folder until checked: names (no traversal, no symlinks), sizes
and SHA-256 checksums from the manifest, the config's schema, and every disk's
header (format as declared, no backing or data file, the declared size). The
format itself is documented in :mod:`ferry.core.export_format`.

An import into a cluster (``--cluster C --volume V``) copies the disks, kernel
and initrd onto the cluster volume (``<volume>/<uuid>/``, where clustered VMs
keep their files) and then makes the VM clustered, owned by this node
(:meth:`ferry.host.cluster.vms.ClusterVms.add`); if that is refused, the
import is undone. An export of a clustered VM runs on its owner, the one node
whose catalog holds it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import stat
import uuid as uuidlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferry.adapters import qemu_img
from ferry.adapters.backup import BlockBackup, Sync
from ferry.adapters.catalog import VmRecord
from ferry.adapters.durable import fsync_dir, fsync_file
from ferry.adapters.firmware import check_firmware_here
from ferry.adapters.hashed_copy import sha256_file as sha256_file  # used by initial_media
from ferry.core import vmstate
from ferry.core.cluster.roles import Priority
from ferry.core.cpu_models import check_cpu
from ferry.core.export_format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    VM_FILE,
    ExportedDisk,
    ExportedNic,
    ExportedVm,
    Manifest,
    ManifestFile,
    parse_manifest,
    parse_vm,
)
from ferry.core.network import apply_network_map, check_networks
from ferry.core.spec import DiskSpec, NicSpec, VmSpec, check_name
from ferry.core.versions import check_host_runs
from ferry.core.vmstate import VmState
from ferry.errors import (
    ConflictError,
    FerryError,
    InvalidInputError,
    NotFoundError,
    StateError,
)
from ferry.host.exchange.disk_files import check_disk_header, import_qcow2
from ferry.host.jobs import Job, JobRegistry
from ferry.host.vms.service import VmService

if TYPE_CHECKING:
    from ferry.host.cluster.vms import ClusterVms

log = logging.getLogger(__name__)

EXPORT = "export"
IMPORT = "import"
IMPORT_MODES = ("register", "copy", "new-id")
Counter = Callable[[int], None]  # hears bytes hashed or copied


class ExchangeService:
    """Exports and imports of this host's VMs."""

    def __init__(self, vms: VmService, jobs: JobRegistry) -> None:
        self.vms = vms
        self.jobs = jobs
        self.config = vms.config
        # Set by the agent: imports into a cluster (None: this host imports plain VMs).
        self.cluster_vms: ClusterVms | None = None

    def recover(self) -> None:
        """After a restart: exports and imports that were running are failed and undone."""
        for job in self.jobs.all():
            if job.kind not in (EXPORT, IMPORT) or job.state != "running":
                continue
            if job.kind == EXPORT:
                target = Path(job.detail["target"])
                for partial in target.parent.glob(f".{target.name}.partial-{job.id}"):
                    shutil.rmtree(partial, ignore_errors=True)
            elif job.vm_uuid and self.vms.catalog.find(job.vm_uuid) is None:
                shutil.rmtree(self.vms.vm_dir(job.vm_uuid), ignore_errors=True)
            self.jobs.update(job, "failed", error="the agent restarted during the job")

    def _folder(self, raw: str, what: str) -> Path:
        path = Path(raw)
        if not path.is_absolute() or ".." in path.parts:
            raise InvalidInputError(f"{what} {raw!r} must be an absolute path without '..'")
        real = path.parent.resolve() / path.name
        roots = [d.resolve() for d in self.config.image_dirs]
        if not any(real.is_relative_to(root) and real != root for root in roots):
            allowed = ", ".join(str(r) for r in roots) or "none configured"
            raise InvalidInputError(
                f"{what} {raw!r} is outside the image dirs of host {self.config.name!r} ({allowed})"
            )
        return real

    def _progress(self, job: Job, done: int, total: int) -> None:
        self.jobs.update(job, progress={"bytes": done, "total": total})

    # == export ==============================================================

    def start_export(self, name: str, to: str, *, live: bool,
                     max_bandwidth: int | None = None) -> Job:  # fmt: skip
        """``max_bandwidth``: bytes/s the live copy may read from the disks (None: no cap)."""
        record = self.vms.get(name)
        if max_bandwidth is not None and not live:
            raise InvalidInputError("--max-bandwidth applies to a live export only")
        target = self._folder(to, "export folder")
        if live and record.state not in (VmState.RUNNING, VmState.PAUSED):
            raise StateError(f"VM {name!r} is {record.state.value}: --live exports a running "
                             "VM; export it without --live")  # fmt: skip
        if not live and vmstate.is_live(record.state):
            raise StateError(f"VM {name!r} is {record.state.value}: stop it first, or export "
                             "a consistent copy while it runs with --live")  # fmt: skip
        if target.exists():
            raise ConflictError(f"export folder {to!r} already exists; choose a new one")
        if not target.parent.is_dir():
            raise NotFoundError(f"the parent of export folder {to!r} does not exist")
        job = self.jobs.create(EXPORT, record.uuid, record.name, "running", target=str(target),
                               live=live, max_bandwidth=max_bandwidth,
                               progress={}, result=None, error=None)  # fmt: skip
        self.jobs.run(job, self._export(job, record, target, live))
        return job

    async def _export(self, job: Job, record: VmRecord, target: Path, live: bool) -> dict[str, Any]:
        partial = target.parent / f".{target.name}.partial-{job.id}"
        partial.mkdir()
        try:
            spec = record.spec
            total = sum(d.size for d in spec.disks)
            disks: list[ExportedDisk] = []
            if live:
                waiting = self.jobs.turn_waiter(job)
                async with self.vms.turns.turn(record.uuid, "a live export", waiting=waiting):
                    # It may have waited behind a move or a stop: look again.
                    record = self.vms.get(record.uuid)
                    if record.state not in (VmState.RUNNING, VmState.PAUSED):
                        raise StateError(f"VM {record.name!r} is {record.state.value} now; "
                                         "the live export did not start")  # fmt: skip
                    await self._backup_live(job, record, partial, total)
            else:
                done = 0
                for index, disk in enumerate(spec.disks):
                    base = done

                    def report(fraction: float, base: int = base, size: int = disk.size) -> None:
                        self._progress(job, base + int(fraction * size), total)

                    await qemu_img.convert_to_qcow2(
                        Path(disk.path), partial / f"disk{index}.qcow2", src_format=disk.format,
                        qemu_img=self.config.qemu_img, progress=report)  # fmt: skip
                    done += disk.size
            for index, disk in enumerate(spec.disks):
                disks.append(ExportedDisk(file=f"disk{index}.qcow2", size=disk.size,
                                          format="qcow2"))  # fmt: skip
            for name in ("kernel", "initrd"):
                source = getattr(spec, name)
                if source:
                    await asyncio.to_thread(shutil.copyfile, source, partial / name)
            exported = ExportedVm(
                name=spec.name, uuid=spec.uuid, config_version=spec.config_version,
                memory=spec.memory, cpus=spec.cpus, append=spec.append,
                kernel="kernel" if spec.kernel else None,
                initrd="initrd" if spec.initrd else None,
                disks=disks, replication=None, display=spec.display, cpu_model=spec.cpu_model,
                nics=[ExportedNic(network=n.network, mac=n.mac, model=n.model)
                      for n in spec.nics],
                firmware=spec.firmware, boot_disk=spec.boot_disk, vars_disk=spec.vars_disk,
            )  # fmt: skip
            (partial / VM_FILE).write_text(exported.model_dump_json(indent=2))
            files = sorted(p.name for p in partial.iterdir())
            entries = []
            for name in files:
                path = partial / name
                # Hashed (CPU, from the page cache) while the disk writes it back.
                digest, _ = await asyncio.gather(asyncio.to_thread(sha256_file, path),
                                                 asyncio.to_thread(fsync_file, path))  # fmt: skip
                entries.append(ManifestFile(path=name, size=path.stat().st_size, sha256=digest))
            manifest = Manifest(format=FORMAT, version=FORMAT_VERSION, vm=VM_FILE, files=entries)
            await asyncio.to_thread(self._seal, partial, manifest)
            partial.rename(target)
            fsync_dir(target.parent)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, partial, True)
            raise
        size = sum(e.size for e in entries)
        log.getChild(record.name).info("exported to %s (%d bytes)", target, size)
        return {"folder": str(target), "bytes": size, "files": len(entries), "live": live}

    @staticmethod
    def _seal(partial: Path, manifest: Manifest) -> None:
        """Make every file durable, then write the manifest that marks it complete."""
        for path in partial.iterdir():
            fsync_file(path)
        manifest_path = partial / MANIFEST
        manifest_path.write_text(manifest.model_dump_json(indent=2))
        fsync_file(manifest_path)
        fsync_dir(partial)

    async def _backup_live(self, job: Job, record: VmRecord, partial: Path, total: int) -> None:
        """A point-in-time full copy of every disk, taken in one transaction."""
        targets = []
        for index, disk in enumerate(record.spec.disks):
            path = partial / f"disk{index}.qcow2"
            await qemu_img.create(path, disk.size, qemu_img=self.config.qemu_img)
            targets.append(path)
        backup = BlockBackup(self.vms.channel(record), f"export-{job.id}",
                             [f"disk{i}" for i in range(len(targets))],
                             what=f"live export of VM {record.name!r}")  # fmt: skip
        # Zeros stay holes, so the export stays sparse; the cap is the export's in total.
        await backup.run(targets, sync=Sync.FULL, sparse=True,
                         speed=job.detail.get("max_bandwidth"),
                         progress=lambda done: self._progress(job, done, total))  # fmt: skip

    # == import ==============================================================

    async def start_import(self, folder: str, *, mode: str, new_name: str | None,
                           cluster: str | None = None, volume: str | None = None,
                           network_map: Mapping[str, str] | None = None) -> Job:  # fmt: skip
        """``cluster`` and ``volume`` together: import as a clustered VM of this node.

        ``network_map``: the exported VM's networks -> this host's. A network
        this host lacks refuses the import before its job starts (read from
        the folder's config as it stands; the job checks it again once the
        folder's checksums held).
        """
        if mode not in IMPORT_MODES:
            raise InvalidInputError(f"--mode must be one of {', '.join(IMPORT_MODES)}")
        source = self._folder(folder, "import folder")
        if source.is_symlink() or not source.is_dir():
            raise NotFoundError(f"import folder {folder!r} is not a folder on host "
                                f"{self.config.name!r}")  # fmt: skip
        if new_name is not None:
            check_name(new_name)
        volume_dir = await self._cluster_target(cluster, volume, mode)
        networks = dict(network_map or {})
        early = self._peek_vm(source)
        if early is not None:
            await self._nics_here(early, new_name or early.name, mode, networks)
        job = self.jobs.create(IMPORT, "", new_name or "?", "running", source=str(source),
                               mode=mode, progress={}, result=None, error=None,
                               cluster=cluster, volume=volume,
                               network_map=networks)  # fmt: skip
        self.jobs.run(job, self._import(job, source, mode, new_name, cluster, volume_dir))
        return job

    def _peek_vm(self, folder: Path) -> ExportedVm | None:
        """The folder's VM config before any checksum, or None (the job then says what is wrong)."""
        try:
            manifest = parse_manifest(self._regular_file(folder, MANIFEST).read_bytes(),
                                      folder=str(folder))  # fmt: skip
            return parse_vm(self._regular_file(folder, manifest.vm).read_bytes(), manifest,
                            folder=str(folder))  # fmt: skip
        except (FerryError, OSError):
            return None

    async def _nics_here(self, vm: ExportedVm, name: str, mode: str,
                   network_map: Mapping[str, str]) -> tuple[NicSpec, ...]:  # fmt: skip
        """The imported VM's NICs on this host's networks, or the one-line refusal.

        Each network (after the map) and its bridge must be here; ``new-id``
        gives new MACs, the other modes keep them, so they must be free here.
        """
        nics = tuple(NicSpec(network=n.network, mac=n.mac, model=n.model) for n in vm.nics)
        probe = VmSpec(name=name, config_version=vm.config_version, memory=vm.memory, nics=nics)
        networks = self.vms.networks
        check_networks(probe, host=self.config.name, host_networks=networks.all(),
                       network_map=network_map)  # fmt: skip
        here = apply_network_map(probe, network_map)
        await networks.check_runnable(here)
        if mode == "new-id":
            return networks.renew_macs(here.nics)
        taken = networks.macs_in_use()
        for nic in here.nics:
            if nic.mac in taken:
                raise ConflictError(f"MAC {nic.mac} of the exported VM is used by VM "
                                    f"{taken[nic.mac]!r} on host {self.config.name!r}; "
                                    "import with --mode new-id (new MACs)")  # fmt: skip
        return here.nics

    async def _cluster_target(self, cluster: str | None, volume: str | None,
                              mode: str) -> Path | None:  # fmt: skip
        """The cluster volume's directory an import into ``cluster`` puts its files in."""
        if cluster is None and volume is None:
            return None
        if cluster is None or volume is None:
            raise InvalidInputError("an import into a cluster needs both --cluster and --volume")
        if mode == "register":
            raise InvalidInputError("--mode register keeps the disks in the import folder; an "
                                    "import into a cluster copies them onto the cluster volume "
                                    "(--mode copy or new-id)")  # fmt: skip
        if self.cluster_vms is None:
            raise InvalidInputError(f"host {self.config.name!r} cannot run clustered VMs")
        membership = self.cluster_vms.membership(cluster)
        volumes = await self.cluster_vms.volumes(membership)
        if volume not in volumes:
            known = ", ".join(sorted(volumes)) or "none"
            raise NotFoundError(f"cluster {cluster!r} has no volume {volume!r} (volumes: "
                                f"{known})")  # fmt: skip
        return Path(volumes[volume])

    async def _check_cluster_free(self, cluster: str, name: str, uuid: str) -> None:
        """Refuse before any file is written: the name or the UUID is taken in the cluster."""
        assert self.cluster_vms is not None
        membership = self.cluster_vms.membership(cluster)
        store, keys = membership.store, membership.keys
        if await store.get(keys.name(name)) is not None:
            raise ConflictError(f"cluster {cluster!r} already has a VM named {name!r}; import "
                                "with --name NEW")  # fmt: skip
        if await store.get(keys.vm_config(uuid)) is not None:
            raise ConflictError(f"cluster {cluster!r} already has VM {uuid} (from this export); "
                                "import with --mode new-id")  # fmt: skip

    def _regular_file(self, folder: Path, name: str) -> Path:
        path = folder / name
        try:
            info = path.lstat()
        except FileNotFoundError:
            raise InvalidInputError(f"{folder}: {name} is missing") from None
        if stat.S_ISLNK(info.st_mode):
            raise InvalidInputError(f"{folder}: {name} is a symlink; exports hold plain files")
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInputError(f"{folder}: {name} is not a regular file")
        return path

    def _counter(self, job: Job, manifest: Manifest) -> Counter:
        """Progress over every file of the folder, hashed or copied."""
        total = sum(f.size for f in manifest.files)
        done = 0

        def count(n: int) -> None:
            nonlocal done
            done += n
            self._progress(job, done, total)

        return count

    async def _verify(
        self, job: Job, folder: Path, *, copying: bool
    ) -> tuple[Manifest, ExportedVm, Counter]:
        """Every file's size and checksum, the config, every disk's header.

        ``copying``: the checksums of qcow2 disks are left to the copy, which
        hashes what it copies (:mod:`.disk_files`); their sizes and headers
        are checked here all the same.
        """
        manifest = parse_manifest(self._regular_file(folder, MANIFEST).read_bytes(),
                                  folder=str(folder))  # fmt: skip
        count = self._counter(job, manifest)
        entries = {entry.path: entry for entry in manifest.files}
        vm_entry = entries.get(manifest.vm)
        vm_bytes = self._regular_file(folder, manifest.vm).read_bytes()
        later: set[str] = set()  # hashed by the copy
        vm_intact = vm_entry is not None and hashlib.sha256(vm_bytes).hexdigest() == vm_entry.sha256
        if copying and vm_intact:
            vm_first = parse_vm(vm_bytes, manifest, folder=str(folder))
            later = {d.file for d in vm_first.disks if d.format == "qcow2"}
        for entry in manifest.files:
            path = self._regular_file(folder, entry.path)
            if path.stat().st_size != entry.size:
                raise InvalidInputError(f"{folder}: {entry.path} is {path.stat().st_size} bytes, "
                                        f"the manifest says {entry.size}")  # fmt: skip
            if entry.path in later:
                continue
            if entry.path == manifest.vm:  # the bytes read above are the ones parsed
                intact = vm_intact
            else:
                intact = await asyncio.to_thread(sha256_file, path, count) == entry.sha256
            if not intact:
                raise InvalidInputError(
                    f"{folder}: {entry.path} does not match its SHA-256 checksum in the "
                    "manifest (damaged or altered)"
                )
        vm = parse_vm(vm_bytes, manifest, folder=str(folder))
        for disk in vm.disks:
            await check_disk_header(folder / disk.file, fmt=disk.format, size=disk.size,
                                    what=f"{folder}: {disk.file}",
                                    qemu_img_bin=self.config.qemu_img)  # fmt: skip
        return manifest, vm, count

    async def _import(self, job: Job, folder: Path, mode: str, new_name: str | None,
                      cluster: str | None = None,
                      volume_dir: Path | None = None) -> dict[str, Any]:  # fmt: skip
        manifest, vm, count = await self._verify(job, folder, copying=mode != "register")
        sums = {entry.path: entry.sha256 for entry in manifest.files}
        name = new_name or vm.name
        check_host_runs(vm.config_version, self.config.functional_level,
                        host=self.config.name, vm=name)  # fmt: skip
        check_cpu(vm.cpu_model, self.vms.cpu, vm=name)
        check_firmware_here(vm.firmware, self.config.firmware_descriptors,
                            host=self.config.name, vm=name)  # fmt: skip
        nics = await self._nics_here(vm, name, mode, job.detail.get("network_map") or {})
        if self.vms.catalog.find(name) is not None:
            raise ConflictError(f"a VM named {name!r} already exists on host "
                                f"{self.config.name!r}; import with --name NEW")  # fmt: skip
        uuid = str(uuidlib.uuid4()) if mode == "new-id" else vm.uuid
        if self.vms.catalog.find(uuid) is not None:
            raise ConflictError(f"VM {uuid} (from this export) already exists on host "
                                f"{self.config.name!r}; import with --mode new-id")  # fmt: skip
        if cluster is not None:
            await self._check_cluster_free(cluster, name, uuid)
        self.jobs.update(job, vm_name=name)
        job.vm_uuid, job.vm_name = uuid, name
        vm_dir = self.vms.vm_dir(uuid)
        vm_dir.mkdir(parents=True)
        # A clustered VM's files go where every node of the cluster sees them.
        files_dir = vm_dir if volume_dir is None else volume_dir / uuid
        try:
            files_dir.mkdir(parents=True, exist_ok=True)
            disks = []
            for index, disk in enumerate(vm.disks):
                source = folder / disk.file
                if mode == "register":
                    disks.append(DiskSpec(path=str(source), size=disk.size, format=disk.format))
                    continue
                target = files_dir / f"disk{index}.qcow2"
                if disk.format == "qcow2":  # hashed as it is copied, checked as copied
                    await import_qcow2(source, target, sha256=sums[disk.file], size=disk.size,
                                       what=f"{folder}: {disk.file}",
                                       qemu_img_bin=self.config.qemu_img,
                                       on_bytes=count)  # fmt: skip
                else:
                    await qemu_img.convert_to_qcow2(source, target, src_format=disk.format,
                                                    qemu_img=self.config.qemu_img)  # fmt: skip
                disks.append(DiskSpec(path=str(target), size=disk.size))
            boot: dict[str, str | None] = {}
            for key in ("kernel", "initrd"):
                file_name = getattr(vm, key)
                if file_name:
                    await asyncio.to_thread(shutil.copyfile, folder / file_name, files_dir / key)
                boot[key] = str(files_dir / key) if file_name else None
            spec = VmSpec(uuid=uuid, name=name, config_version=vm.config_version,
                          memory=vm.memory, cpus=vm.cpus, disks=tuple(disks),
                          append=vm.append, display=vm.display, cpu_model=vm.cpu_model,
                          nics=nics, firmware=vm.firmware, boot_disk=vm.boot_disk,
                          vars_disk=vm.vars_disk, **boot)  # fmt: skip
            self.vms.catalog.add_vm(spec)
            if cluster is not None:
                assert self.cluster_vms is not None
                await self.cluster_vms.add(cluster, name, priority=Priority.MEDIUM)
        except BaseException:
            if self.vms.catalog.find(uuid) is not None:
                self.vms.catalog.delete(uuid)
            await asyncio.to_thread(shutil.rmtree, vm_dir, True)
            await asyncio.to_thread(shutil.rmtree, files_dir, True)
            raise
        notes = []
        if vm.replication:
            notes.append(
                "the export's replication settings were not imported; enable replication "
                "again, using the existing replica as the initial copy"
            )
        log.getChild(name).info("imported from %s (%s%s)", folder, mode,
                                f", into cluster {cluster}" if cluster else "")  # fmt: skip
        result: dict[str, Any] = {"vm": name, "uuid": uuid, "mode": mode, "notes": notes}
        if cluster is not None:
            result.update(cluster=cluster, files=str(files_dir))
        return result
