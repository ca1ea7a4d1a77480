"""An import's disk: copied and hashed in one pass, then checked as the copy it is.

An import used to read each disk of the folder twice: once to check its
SHA-256 against the manifest, then again in ``qemu-img convert``. For a
qcow2 disk (what every ferry export holds) it is now read once:
:func:`~ferry.adapters.hashed_copy.copy_hashed` writes the host's copy and
hashes the bytes it copies, and every header check runs on that copy, the
file the VM will use. So a folder changed after the hash was taken cannot
slip anything past the checks, as it could between a check of the folder's
file and the convert that read it again. The copy is sparse (holes and zero
pieces stay holes). A qcow2 with persistent dirty bitmaps (never in an
export) would bring another VM's change tracking; it is converted from the
checked copy, which drops them. Other formats are converted as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from ferry.adapters import qemu_img
from ferry.adapters.hashed_copy import copy_hashed
from ferry.errors import InvalidInputError


async def check_disk_header(path: Path, *, fmt: str, size: int, what: str,
                            qemu_img_bin: str) -> dict[str, object]:  # fmt: skip
    """``path`` must be a self-contained ``fmt`` image of virtual size ``size``; its info."""
    info = await qemu_img.info(path, qemu_img=qemu_img_bin)
    if info.get("format") != fmt:
        raise InvalidInputError(f"{what} is {info.get('format')}, not {fmt}")
    qemu_img.check_self_contained(info, what=what)
    if int(info.get("virtual-size", -1)) != size:
        raise InvalidInputError(f"{what} has virtual size {info.get('virtual-size')}, "
                                f"the config says {size}")  # fmt: skip
    return info


async def import_qcow2(source: Path, target: Path, *, sha256: str, size: int, what: str,
                       qemu_img_bin: str, on_bytes: Callable[[int], None]) -> None:  # fmt: skip
    """Copy the folder's qcow2 ``source`` to ``target``, hashing it as it goes; check it.

    ``on_bytes`` is called from the copying thread. Raises InvalidInputError
    (and leaves ``target`` for the caller's undo to remove) when the copy's
    hash is not the manifest's ``sha256`` or its header is not what the
    config says.
    """
    loop = asyncio.get_running_loop()

    def heard(n: int) -> None:
        loop.call_soon_threadsafe(on_bytes, n)

    digest = await asyncio.to_thread(copy_hashed, source, target, heard)
    if digest != sha256:
        raise InvalidInputError(f"{what} does not match its SHA-256 checksum in the manifest "
                                "(damaged or altered)")  # fmt: skip
    info = await check_disk_header(target, fmt="qcow2", size=size, what=what,
                                   qemu_img_bin=qemu_img_bin)  # fmt: skip
    await qemu_img.check(target, qemu_img=qemu_img_bin)  # its metadata is sound
    specific = info.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    if isinstance(data, dict) and data.get("bitmaps"):
        plain = target.with_name(f".{target.name}.plain")
        await qemu_img.convert_to_qcow2(target, plain, src_format="qcow2",
                                        qemu_img=qemu_img_bin)  # fmt: skip
        plain.replace(target)
