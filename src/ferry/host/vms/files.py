"""The files a new VM gets: its disks (empty, or converted from an image) and
its own copies of kernel and initrd.

Paths an admin names must lie inside the host's ``image_dirs``. A VM's disks
live in its VM dir, or in its own dir on a shared volume (opened with
``direct`` then, since two hosts' QEMUs use the file during a move).
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path

from ferry.adapters import qemu_img
from ferry.adapters.catalog import Catalog
from ferry.core.firmware import UefiFirmware
from ferry.core.spec import DiskSpec
from ferry.errors import InvalidInputError, NotFoundError
from ferry.guest.build import default_cache_dir, ensure_guest
from ferry.host.config import HostConfig
from ferry.host.vms.requests import NewDisk, NewVm


def allowed_file(config: HostConfig, raw: str, what: str) -> Path:
    """Resolve a host path given by an admin; it must sit in image_dirs."""
    path = Path(raw)
    if not path.is_absolute():
        raise InvalidInputError(f"{what} path {raw!r} must be absolute")
    if ".." in path.parts:
        raise InvalidInputError(f"{what} path {raw!r} must not contain '..'")
    real = path.resolve()
    roots = [d.resolve() for d in config.image_dirs]
    if not any(real.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(r) for r in roots) or "none configured"
        raise InvalidInputError(
            f"{what} path {raw!r} is outside the allowed image dirs ({allowed}) of host "
            f"{config.name!r}: move it there or add its dir to image_dirs"
        )
    if not real.is_file():
        raise NotFoundError(f"{what} {raw!r} does not exist on host {config.name!r}")
    return real


def disk_dir(config: HostConfig, catalog: Catalog, volume: str | None, vm_dir: Path) -> Path:
    """Where the VM's disks go: its VM dir, or its own dir on the named volume."""
    if volume is None:
        return vm_dir
    volumes = catalog.volumes()
    if volume not in volumes:
        known = ", ".join(sorted(volumes)) or "none"
        raise NotFoundError(f"no volume named {volume!r} on host {config.name!r} (known: {known})")
    return Path(volumes[volume]) / vm_dir.name


async def make_disk(config: HostConfig, request: NewDisk, dst: Path, *, direct: bool) -> DiskSpec:
    if request.image is None:
        assert request.size is not None
        await qemu_img.create(dst, request.size, qemu_img=config.qemu_img)
        return DiskSpec(path=str(dst), size=request.size, direct=direct)
    src = allowed_file(config, request.image, "image")
    src_info = await qemu_img.info(src, qemu_img=config.qemu_img)
    qemu_img.check_self_contained(src_info, what=f"image {request.image!r}")
    await qemu_img.convert_to_qcow2(
        src, dst, src_format=str(src_info["format"]), qemu_img=config.qemu_img
    )
    return DiskSpec(path=str(dst), size=int(src_info["virtual-size"]), direct=direct)


async def make_vars_store(config: HostConfig, uefi: UefiFirmware, dst: Path, *,
                          direct: bool) -> DiskSpec:  # fmt: skip
    """A UEFI VM's own variable store: a qcow2 copy of OVMF's template (see core/firmware.py)."""
    template = Path(uefi.vars_template)
    info = await qemu_img.info(template, qemu_img=config.qemu_img, fmt=uefi.vars_format)
    await qemu_img.convert_to_qcow2(template, dst, src_format=uefi.vars_format,
                                    qemu_img=config.qemu_img)  # fmt: skip
    return DiskSpec(path=str(dst), size=int(info["virtual-size"]), direct=direct)


@dataclass(frozen=True)
class BootFiles:
    """The VM's own kernel and initrd (None: it boots from its disk) and command line."""

    kernel: str | None
    initrd: str | None
    append: str | None


async def copy_boot_files(config: HostConfig, request: NewVm, vm_dir: Path) -> BootFiles:
    """Copy the kernel and initrd into the VM dir, so the VM stays whole when it moves."""
    kernel = initrd = None
    append = request.append
    if request.guest == "test":
        cache = config.guest_cache or default_cache_dir()
        guest = await asyncio.to_thread(ensure_guest, cache)
        kernel, initrd = guest.kernel, guest.initrd
        append = f"{guest.append} {request.append}" if request.append else guest.append
    elif request.kernel:
        kernel = allowed_file(config, request.kernel, "kernel")
        initrd = allowed_file(config, request.initrd, "initrd") if request.initrd else None
    if kernel is not None:
        await asyncio.to_thread(shutil.copyfile, kernel, vm_dir / "kernel")
    if initrd is not None:
        await asyncio.to_thread(shutil.copyfile, initrd, vm_dir / "initrd")
    return BootFiles(
        kernel=str(vm_dir / "kernel") if kernel else None,
        initrd=str(vm_dir / "initrd") if initrd else None,
        append=append,
    )
