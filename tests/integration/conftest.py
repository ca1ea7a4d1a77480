"""Fixtures for tests that drive QEMU directly (adapters, no agent): the test guest on a disk."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from ferry.adapters import qemu
from ferry.core.spec import DiskSpec, RunContext, VmSpec, qemu_argv
from ferry.guest.build import ensure_guest

DISK_SIZE = 32 * 1024**2


@asynccontextmanager
async def running_guest(spec: VmSpec, work: Path) -> AsyncIterator[qemu.QmpChannel]:
    ctx = RunContext(qemu_binary="qemu-system-x86_64", accelerator="tcg",
                     pidfile=work / "qemu.pid", qmp_socket=work / "qmp.sock",
                     serial_log=work / "serial.log")  # fmt: skip
    pid = await qemu.launch(qemu_argv(spec, ctx), pidfile=ctx.pidfile, uuid=spec.uuid)
    channel = qemu.QmpChannel(ctx.qmp_socket, name=spec.name)
    try:
        await channel.connect()
        yield channel
    finally:
        await channel.close()
        await qemu.kill_process(pid, spec.uuid)


async def wait_log(work: Path, done: Callable[[str], bool], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = (
            (work / "serial.log").read_text(errors="replace")
            if (work / "serial.log").exists()
            else ""
        )
        if done(text):
            return text
        assert time.monotonic() < deadline, f"console never matched: {text[-500:]}"
        await asyncio.sleep(0.2)


def same_image(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)],
                          capture_output=True).returncode == 0  # fmt: skip


@pytest.fixture
def guest_spec(tmp_path: Path, guest_cache: Path) -> VmSpec:
    guest = ensure_guest(guest_cache)
    disk = tmp_path / "disk0.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(DISK_SIZE)],
                   check=True)  # fmt: skip
    return VmSpec(
        name="cbt",
        config_version=3,
        memory=128 * 1024**2,
        disks=(DiskSpec(path=str(disk), size=DISK_SIZE),),
        kernel=str(guest.kernel),
        initrd=str(guest.initrd),
        append=guest.append,
    )
