"""Disk images through ``qemu-img``: create, convert, inspect.

Runs in a thread pool-free way (asyncio subprocesses) so the agent keeps
answering while a large image converts. Failures become ``QemuError`` with
qemu-img's own last line.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ferry.errors import InvalidInputError, QemuError

# qemu-img works for the agent: if the agent dies, so does it (no orphan
# writing into a folder a restarted agent cleans up). setpriv (util-linux, in
# every Debian) sets the parent-death signal without a preexec_fn, which is
# unsafe in a process with threads.
_DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []


_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


async def _spawn(qemu_img: str, args: list[str]) -> asyncio.subprocess.Process:
    try:
        return await asyncio.create_subprocess_exec(
            *_DIE_WITH_PARENT, qemu_img, *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    except OSError as exc:
        raise QemuError(f"cannot run {qemu_img}: {exc.strerror}; install qemu-utils") from exc


def _failed(args: list[str], returncode: int | None, stderr: bytes) -> QemuError:
    """qemu-img's own last line is the reason we report."""
    lines = [ln for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    reason = lines[-1] if lines else f"exit status {returncode}"
    return QemuError(f"qemu-img {args[0]} failed: {reason}")


async def _run(qemu_img: str, *args: str) -> str:
    proc = await _spawn(qemu_img, list(args))
    stdout, stderr = await proc.communicate()
    if proc.returncode != 0:
        raise _failed(list(args), proc.returncode, stderr)
    return stdout.decode(errors="replace")


async def create(path: Path, size: int, *, qemu_img: str = "qemu-img") -> None:
    await _run(qemu_img, "create", "-q", "-f", "qcow2", str(path), str(size))


async def add_bitmap(path: Path, name: str, *, granularity: int,
                     qemu_img: str = "qemu-img") -> None:  # fmt: skip
    """A persistent dirty bitmap in a qcow2 that no QEMU has open: the QEMU that opens it
    next records every write in it."""
    await _run(qemu_img, "bitmap", "--add", "-g", str(granularity), str(path), name)


async def create_overlay(
    path: Path, backing: Path, size: int, *, qemu_img: str = "qemu-img"
) -> None:
    """A new qcow2 over ``backing``: clusters it does not hold read through."""
    await _run(qemu_img, "create", "-q", "-f", "qcow2", "-b", str(backing.resolve()),
               "-F", "qcow2", str(path), str(size))  # fmt: skip


async def check(path: Path, *, qemu_img: str = "qemu-img") -> None:
    """``qemu-img check``: refuses an image with corruption or leaks it cannot explain."""
    await _run(qemu_img, "check", "-q", "-f", "qcow2", str(path))


async def rebase_unsafe(path: Path, backing: Path, *, qemu_img: str = "qemu-img") -> None:
    """Point ``path`` at ``backing`` without copying (both must read the same below it)."""
    await _run(qemu_img, "rebase", "-u", "-f", "qcow2", "-b", str(backing.resolve()),
               "-F", "qcow2", str(path))  # fmt: skip


async def rebase(path: Path, backing: Path, *, qemu_img: str = "qemu-img") -> None:
    """Point ``path`` at ``backing``, first copying in what differs (it reads the same after)."""
    await _run(qemu_img, "rebase", "-f", "qcow2", "-b", str(backing.resolve()),
               "-F", "qcow2", str(path))  # fmt: skip


async def commit(overlay: Path, *, qemu_img: str = "qemu-img") -> None:
    """Write ``overlay``'s clusters into its backing file; ``-d`` leaves it intact."""
    await _run(qemu_img, "commit", "-q", "-d", "-f", "qcow2", str(overlay))


async def convert_to_qcow2(
    src: Path,
    dst: Path,
    *,
    src_format: str,
    qemu_img: str = "qemu-img",
    progress: Callable[[float], None] | None = None,
) -> None:
    """Copy ``src`` into a new sparse, consolidated qcow2 (no backing file).

    The source format is always given (never probed: a raw image could pose
    as another format). ``progress`` gets the fraction done as qemu-img -p
    reports it.
    """
    args = ["convert", "-p", "-f", src_format, "-O", "qcow2", str(src), str(dst)]
    proc = await _spawn(qemu_img, args)
    assert proc.stdout is not None and proc.stderr is not None
    buffer = b""
    while chunk := await proc.stdout.read(256):
        buffer += chunk
        *done, buffer = re.split(rb"[\r\n]", buffer)
        for line in done:
            match = _PROGRESS.search(line)
            if match and progress is not None:
                progress(float(match.group(1)) / 100)
    stderr = await proc.stderr.read()
    if await proc.wait() != 0:
        raise _failed(args, proc.returncode, stderr)


def check_self_contained(info: dict[str, Any], *, what: str) -> None:
    """Refuse images that would make QEMU open other files."""
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise InvalidInputError(
            f"{what} has a backing file ({info.get('backing-filename')}); only self-contained "
            "images are accepted (flatten it with qemu-img convert)"
        )
    specific = (info.get("format-specific") or {}).get("data") or {}
    if specific.get("data-file"):
        raise InvalidInputError(f"{what} keeps its data in another file ({specific['data-file']})")
    for extent in specific.get("extents") or []:
        if extent.get("filename") and Path(extent["filename"]).name != Path(info["filename"]).name:
            raise InvalidInputError(f"{what} is a multi-file VMDK; convert it to one file first")


async def info(path: Path, *, qemu_img: str = "qemu-img", fmt: str | None = None) -> dict[str, Any]:
    """``qemu-img info`` of ``path``; ``-U`` so images in use can be read.

    ``fmt``: open it as that format (a file from outside is never probed: a raw
    image could pose as a qcow2 with a backing file on the host).
    """
    args = ["info", "-U", "--output=json", *(["-f", fmt] if fmt else []), str(path)]
    out = await _run(qemu_img, *args)
    result: dict[str, Any] = json.loads(out)
    return result
