"""Guest writes and bare backups for the replication benchmarks, over a VM's test monitor.

The lab hosts run with ``test_monitor = true`` in host.toml, so every VM's
QEMU has a second QMP monitor (``{runtime}/{short uuid}.tqmp``) besides the
agent's. Through it a benchmark writes into the running disk with HMP
``qemu-io`` (cheap: the guest may be paused or idle) and runs the *bare*
incremental backup of the same change from a bitmap of its own
(``bench-bare``), the floor a replication cycle is measured against.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ferry.adapters import qemu, qemu_img
from ferry.adapters.backup import BlockBackup, Sync

MiB = 1024**2
BARE_BITMAP = "bench-bare"


def monitor_socket(lab_root: Path, host: str, uuid: str) -> Path:
    """The test monitor of VM ``uuid`` on lab host ``host``."""
    from ferry.host.config import load_host_config
    from ferry.host.vms.process import short_name

    config = load_host_config(lab_root / "hosts" / host / "host.toml")
    socket = config.runtime_dir / f"{short_name(uuid)}.tqmp"
    if not socket.exists():
        raise RuntimeError(f"no test monitor for VM {uuid} on {host} (host.toml test_monitor?)")
    return socket


class TestMonitor:
    """One VM's test monitor."""

    def __init__(self, socket: Path, name: str) -> None:
        self.channel = qemu.QmpChannel(socket, name=name)
        self.name = name

    async def __aenter__(self) -> TestMonitor:
        await self.channel.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()

    async def hmp(self, line: str) -> str:
        return str(await self.channel.execute("human-monitor-command", {"command-line": line}))

    async def write(self, offset: int, length: int, *, source: Path | None = None,
                    pattern: int = 0x5A) -> None:  # fmt: skip
        """Write ``length`` bytes at ``offset`` of disk 0: ``source``'s bytes, else a pattern."""
        what = f"-s {source}" if source is not None else f"-P {pattern}"
        out = await self.hmp(f'qemu-io -d vblk0/virtio-backend "write {what} {offset} {length}"')
        if "error" in out.lower() or "failed" in out.lower():
            raise RuntimeError(f"qemu-io on {self.name}: {out.strip()}")

    async def flush(self) -> None:
        await self.hmp('qemu-io -d vblk0/virtio-backend "flush"')

    async def random_writes(self, scratch: Path, total: int, disk_size: int, seed: int) -> None:
        """``total`` bytes of fresh random data in scattered 1 MiB writes."""
        slots = disk_size // MiB - 1
        for i in range(total // MiB):
            source = scratch / f"w-{self.name}-{seed}-{i}"
            source.write_bytes(os.urandom(MiB))
            await self.write(((i * 61 + seed * 7) % slots) * MiB, MiB, source=source)
            source.unlink()
        await self.flush()

    async def start_bare_bitmap(self) -> None:
        await self.channel.execute("block-dirty-bitmap-add", {
            "node": "disk0", "name": BARE_BITMAP, "granularity": 64 * 1024})  # fmt: skip

    async def bare_backup(self, target: Path, size: int, tag: str) -> float:
        """The incremental backup of ``bench-bare`` into ``target``, alone; its seconds."""
        started = time.monotonic()
        await qemu_img.create(target, size)
        await BlockBackup(self.channel, f"bare-{tag}", ["disk0"], what="bare backup").run(
            [target], sync=Sync.INCREMENTAL, bitmap=BARE_BITMAP, cancel_on_exit=False
        )
        return time.monotonic() - started
