"""Disk images through ``qemu-img``: create, convert, inspect.

Runs in a thread pool-free way (asyncio subprocesses) so the agent keeps
answering while a large image converts. Failures become ``QemuError`` with
qemu-img's own last line.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from ferry.errors import QemuError


async def _run(qemu_img: str, *args: str) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            qemu_img, *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    except OSError as exc:
        raise QemuError(f"cannot run {qemu_img}: {exc.strerror}; install qemu-utils") from exc
    stdout, stderr = await proc.communicate()
    if proc.returncode != 0:
        lines = [ln for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise QemuError(f"qemu-img {args[0]} failed: {reason}")
    return stdout.decode(errors="replace")


async def create(path: Path, size: int, *, qemu_img: str = "qemu-img") -> None:
    await _run(qemu_img, "create", "-q", "-f", "qcow2", str(path), str(size))


async def convert_to_qcow2(src: Path, dst: Path, *, qemu_img: str = "qemu-img") -> None:
    """Copy ``src`` (any format qemu-img reads) into a new sparse qcow2."""
    await _run(qemu_img, "convert", "-q", "-O", "qcow2", str(src), str(dst))


async def info(path: Path, *, qemu_img: str = "qemu-img") -> dict[str, Any]:
    """``qemu-img info`` of ``path``; ``-U`` so images in use can be read."""
    out = await _run(qemu_img, "info", "-U", "--output=json", str(path))
    result: dict[str, Any] = json.loads(out)
    return result
