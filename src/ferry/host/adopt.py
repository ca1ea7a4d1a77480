"""Adopting a VM made elsewhere: a libvirt domain XML or an OVF appliance on this host.

Everything is checked before anything is registered, in two stages. Before
the job starts (:meth:`AdoptionService.start`, one line on any refusal): the
document lies in the host's ``image_dirs`` and parses safely into a plan
(:mod:`ferry.core.adopt`); the name and UUID are free; the memory and vCPUs
fit; the CPU model runs here; every NIC's network (through ``--network-map``)
exists with its bridge, and its MAC is free; a libvirt domain's disks, kernel
and initrd lie in ``image_dirs``; an appliance's disks lie inside its folder
(or archive) with the sizes its descriptor gives, covered by its manifest.
Then the job (kind ``adopt``): each appliance disk hashed against the
manifest (an OVA's extracted while hashed), ``qemu-img info`` of each disk
opened as its declared format (never probed) must be self-contained, of the
declared VMDK kind and capacity; then each is converted to a new qcow2 in the
VM's dir, and only then the VM is registered. Any failure removes the VM's
dir: nothing of it is left. The result carries ``notes``: what of the source
VM was not carried over.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from ferry.adapters import qemu_img
from ferry.core.adopt.headers import HEADER_BYTES, check_header
from ferry.core.adopt.libvirt import parse_domain
from ferry.core.adopt.plan import AdoptedDisk, AdoptionPlan
from ferry.core.adopt.safe_xml import MAX_DOCUMENT
from ferry.core.cpu_models import check_model_name, cpu_refusal, default_model
from ferry.core.firmware import INSTALL_HINT, UefiFirmware
from ferry.core.network import NicOption, check_network_map, network_refusal
from ferry.core.spec import DiskSpec, NicSpec, VmSpec, check_name, check_resources
from ferry.errors import ConflictError, InvalidInputError, NotFoundError
from ferry.host.appliance import Appliance, ApplianceDisk, open_appliance
from ferry.host.jobs import Job, JobRegistry
from ferry.host.vms.files import allowed_file, make_vars_store
from ferry.host.vms.service import VmService

log = logging.getLogger(__name__)

ADOPT = "adopt"
Origin = Literal["libvirt", "ovf"]


@dataclass(frozen=True)
class _Checked:
    """What the checks before the job found: the plan and where each disk's bytes are."""

    plan: AdoptionPlan
    spec: VmSpec
    disks: tuple[ApplianceDisk, ...]
    appliance: Appliance | None
    notes: tuple[str, ...]
    uefi: UefiFirmware | None = None


class AdoptionService:
    """``vm import --libvirt`` and ``vm import --ovf`` on this host."""

    def __init__(self, vms: VmService, jobs: JobRegistry) -> None:
        self.vms = vms
        self.jobs = jobs
        self.config = vms.config

    def recover(self) -> None:
        """After a restart: an adoption that was running is failed and its files removed."""
        for job in self.jobs.all():
            if job.kind != ADOPT or job.state != "running":
                continue
            if job.vm_uuid and self.vms.catalog.find(job.vm_uuid) is None:
                shutil.rmtree(self.vms.vm_dir(job.vm_uuid), ignore_errors=True)
            self.jobs.update(job, "failed", error="the agent restarted during the adoption")

    async def start(
        self,
        origin: Origin,
        path: str,
        *,
        name: str | None = None,
        network_map: dict[str, str] | None = None,
    ) -> Job:
        """Check everything that is cheap to check, then adopt in a job."""
        what = "domain XML" if origin == "libvirt" else "OVF appliance"
        source = allowed_file(self.config, path, what)
        checked = await self._check(origin, source, name, check_network_map(network_map or {}))
        spec = checked.spec
        job = self.jobs.create(
            ADOPT,
            spec.uuid,
            spec.name,
            "running",
            source=str(source),
            origin=origin,
            progress={},
            result=None,
            error=None,
        )
        self.jobs.run(job, self._adopt(job, checked))
        return job

    # == checks before the job ================================================

    async def _check(
        self, origin: Origin, source: Path, name: str | None, network_map: dict[str, str]
    ) -> _Checked:
        appliance: Appliance | None = None
        if origin == "libvirt":
            data = await asyncio.to_thread(_read_document, source)
            plan = parse_domain(data, what=f"domain XML {source}")
            disks = tuple(self._domain_disk(d) for d in plan.disks)
            plan = self._domain_boot_files(plan)
        else:
            appliance = await asyncio.to_thread(open_appliance, source)
            plan, disks = appliance.plan, appliance.disks
        if name is not None:
            plan = replace(plan, name=check_name(name))
        notes = list(plan.not_carried)
        if self.vms.catalog.find(plan.name) is not None:
            raise ConflictError(
                f"a VM named {plan.name!r} already exists on host "
                f"{self.config.name!r}; adopt it with --name NEW"
            )
        uuid = plan.uuid
        if uuid is not None and self.vms.catalog.find(uuid) is not None:
            raise ConflictError(
                f"VM {uuid} (the domain's UUID) already exists on host "
                f"{self.config.name!r}: it was adopted or imported already"
            )
        check_resources(
            plan.memory, plan.cpus, host_memory=self.vms.host_memory, host_cpus=self.vms.host_cpus
        )
        cpu_model = self._cpu_model(plan, notes)
        spec = VmSpec(
            uuid=uuid or str(uuidlib.uuid4()),
            name=plan.name,
            config_version=self.config.functional_level,
            memory=plan.memory,
            cpus=plan.cpus,
            display=plan.display,
            cpu_model=cpu_model,
            guest_agent=plan.guest_agent,
            append=plan.append,
        )
        spec = spec.model_copy(update={"nics": await self._nics(plan, spec, network_map, notes)})
        uefi = self._firmware(plan)
        spec = spec.model_copy(update={"firmware": plan.firmware})
        return _Checked(plan=plan, spec=spec, disks=disks, appliance=appliance,
                        notes=tuple(notes), uefi=uefi)  # fmt: skip

    def _domain_disk(self, disk: AdoptedDisk) -> ApplianceDisk:
        assert disk.source is not None
        path = allowed_file(self.config, disk.source, f"disk {disk.target}")
        return ApplianceDisk(disk=disk, size=path.stat().st_size, path=path)

    def _domain_boot_files(self, plan: AdoptionPlan) -> AdoptionPlan:
        kernel = allowed_file(self.config, plan.kernel, "kernel") if plan.kernel else None
        initrd = allowed_file(self.config, plan.initrd, "initrd") if plan.initrd else None
        return replace(
            plan, kernel=str(kernel) if kernel else None, initrd=str(initrd) if initrd else None
        )

    def _cpu_model(self, plan: AdoptionPlan, notes: list[str]) -> str:
        """The source's model where this host's QEMU knows it; else the default (a note)."""
        fallback = default_model(self.vms.accelerator)
        model = plan.cpu_model
        if model is None:
            return fallback
        known = self.vms.cpu.find(model) is not None if self.vms.cpu.models else True
        try:
            check_model_name(model)
        except InvalidInputError:
            known = False
        if not known:
            notes.append(
                f"CPU model {model!r} is not one this host's QEMU knows; the VM runs "
                f"ferry's default {fallback!r}"
            )
            return fallback
        refusal = cpu_refusal(model, self.vms.cpu)
        if refusal is not None:
            raise InvalidInputError(
                f"{refusal}; adopt it elsewhere, or change the CPU model in the source first"
            )
        return model

    async def _nics(
        self, plan: AdoptionPlan, spec: VmSpec, network_map: dict[str, str], notes: list[str]
    ) -> tuple[NicSpec, ...]:
        """The NICs on this host's networks (mapped), models this QEMU has, MACs free."""
        networks = self.vms.networks
        # Only the networks matter to the check; a NIC without a MAC gets one below.
        sketch = spec.model_copy(
            update={
                "nics": tuple(
                    NicSpec(network=n.network, mac=n.mac or "02:00:00:00:00:00", model=n.model)
                    for n in plan.nics
                )
            }
        )
        refusal = network_refusal(
            sketch, host=self.config.name, host_networks=networks.all(), network_map=network_map
        )
        if refusal is not None:
            raise InvalidInputError(refusal)
        models = await networks.nic_models()
        options = []
        for nic in plan.nics:
            model = nic.model
            if model != "virtio" and model not in models:
                notes.append(
                    f"NIC {nic.mac or nic.network}: model {model} is not in this host's "
                    "QEMU; it becomes virtio"
                )
                model = "virtio"
            options.append(
                NicOption(
                    network=network_map.get(nic.network, nic.network), mac=nic.mac, model=model
                )
            )
        return await networks.new_nics(options)

    def _firmware(self, plan: AdoptionPlan) -> UefiFirmware | None:
        """This host's OVMF for a UEFI source (refused without one); None for BIOS."""
        if plan.firmware != "uefi":
            return None
        uefi = self.vms.processes.uefi()
        if uefi is None:
            raise NotFoundError(f"{plan.name!r} boots through UEFI but host {self.config.name!r} "
                                f"has no UEFI firmware (OVMF): {INSTALL_HINT}")  # fmt: skip
        return uefi

    # == the job ==============================================================

    async def _adopt(self, job: Job, checked: _Checked) -> dict[str, Any]:
        spec, plan = checked.spec, checked.plan
        vm_dir = self.vms.vm_dir(spec.uuid)
        staging = vm_dir / "staging"
        # Bytes read: each appliance disk once to hash (an OVA's while extracted), then
        # each disk once more to convert.
        sizes = [d.size for d in checked.disks]
        total = sum(sizes) * (2 if checked.appliance is not None else 1)
        done = 0

        def count(n: int) -> None:
            nonlocal done
            done += n
            self.jobs.update(job, progress={"bytes": min(done, total), "total": total})

        vm_dir.mkdir(parents=True)
        try:
            staging.mkdir()
            if checked.appliance is not None:
                # The job registry is the loop's: the hashing thread reports through it.
                loop = asyncio.get_running_loop()

                def from_thread(n: int) -> None:
                    loop.call_soon_threadsafe(count, n)

                sources = await asyncio.to_thread(checked.appliance.stage, staging, from_thread)
            else:
                sources = [d.path for d in checked.disks]
            disks = []
            for index, (item, src) in enumerate(zip(checked.disks, sources, strict=True)):
                target = vm_dir / f"disk{index}.qcow2"
                disks.append(await self._disk(item, src, target, count))
            update: dict[str, Any] = {"boot_disk": plan.boot_disk}
            if checked.uefi is not None:  # a fresh variable store after the guest's disks
                update["vars_disk"] = len(disks)
                target = vm_dir / f"disk{len(disks)}.qcow2"
                disks.append(await make_vars_store(self.config, checked.uefi, target, direct=False))
            boot: dict[str, str | None] = {"kernel": None, "initrd": None}
            for key in ("kernel", "initrd"):
                file = getattr(plan, key)
                if file:
                    await asyncio.to_thread(shutil.copyfile, file, vm_dir / key)
                    boot[key] = str(vm_dir / key)
            await asyncio.to_thread(shutil.rmtree, staging)
            spec = spec.model_copy(update={"disks": tuple(disks), **update, **boot})
            self.vms.catalog.add_vm(spec)
        except BaseException:
            if self.vms.catalog.find(spec.uuid) is not None:
                self.vms.catalog.delete(spec.uuid)
            await asyncio.to_thread(shutil.rmtree, vm_dir, True)
            raise
        log.getChild(spec.name).info(
            "adopted from %s %s (%d disks, %d NICs)",
            plan.origin,
            job.detail.get("source"),
            len(disks),
            len(spec.nics),
        )
        return {
            "vm": spec.name,
            "uuid": spec.uuid,
            "origin": plan.origin,
            "disks": len(disks) - (checked.uefi is not None),
            "nics": [n.model_dump() for n in spec.nics],
            "cpu_model": spec.cpu_model,
            "firmware": plan.firmware,
            "notes": list(checked.notes),
        }

    async def _disk(
        self, item: ApplianceDisk, src: Path | None, target: Path, count: Callable[[int], None]
    ) -> DiskSpec:
        disk = item.disk
        tool = self.config.qemu_img
        if src is None:
            assert disk.capacity is not None
            await qemu_img.create(target, disk.capacity, qemu_img=tool)
            return DiskSpec(path=str(target), size=disk.capacity)
        what = f"disk {disk.target} ({disk.source})"
        check_header(disk.format, await asyncio.to_thread(_head, src), what=what)
        info = await qemu_img.info(src, qemu_img=tool, fmt=disk.format)
        qemu_img.check_self_contained(info, what=what)
        size = int(info.get("virtual-size", -1))
        if disk.capacity is not None and size != disk.capacity:
            raise InvalidInputError(
                f"{what} has virtual size {size}; the descriptor says {disk.capacity}"
            )
        if disk.subformat is not None:
            data = (info.get("format-specific") or {}).get("data") or {}
            kind = data.get("create-type")
            if kind != disk.subformat:
                raise InvalidInputError(
                    f"{what} is a {kind} VMDK; the descriptor says {disk.subformat}"
                )

        reported = 0

        def report(fraction: float) -> None:
            nonlocal reported
            now = int(fraction * item.size)
            count(now - reported)
            reported = now

        await qemu_img.convert_to_qcow2(
            src, target, src_format=disk.format, qemu_img=tool, progress=report
        )
        count(item.size - reported)
        return DiskSpec(path=str(target), size=size)


def _head(path: Path) -> bytes:
    """A disk file's first bytes (a symlink put in its place since the check is refused)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        return handle.read(HEADER_BYTES)


def _read_document(path: Path) -> bytes:
    with path.open("rb") as handle:
        return handle.read(MAX_DOCUMENT + 1)
