"""Changed-block tracking against a real QEMU running the test guest (no agent).

Proves the primary side of a replication cycle: a full point-in-time copy,
deltas holding only changed clusters that chain onto it, a chain equal to the
disk at the delta's instant, records on it forming a valid prefix, a bitmap
that survives a clean QEMU exit and is reported unusable after SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from ferry.adapters import qemu, qemu_img
from ferry.adapters.cbt import ChangedBlockTracker
from ferry.core.spec import VmSpec
from ferry.guest.records import read_records
from tests.integration.conftest import DISK_SIZE, running_guest, same_image, wait_log

pytestmark = pytest.mark.integration


def allocated(path: Path) -> int:
    """Bytes of data held by ``path`` itself (not its backing chain)."""
    out = subprocess.run(["qemu-img", "map", "-U", "--output=json", str(path)],
                         capture_output=True, check=True, text=True).stdout  # fmt: skip
    return sum(e["length"] for e in json.loads(out) if e["data"] and e["depth"] == 0)


def test_full_copy_then_deltas_chain_to_the_disk(guest_spec: VmSpec, tmp_path: Path) -> None:
    points = tmp_path / "points"
    points.mkdir()
    disk = Path(guest_spec.disks[0].path)

    async def scenario() -> None:
        async with running_guest(guest_spec, tmp_path) as channel:
            tracker = ChangedBlockTracker(channel, guest_spec.disks, vm="cbt")
            await wait_log(tmp_path, lambda t: "seq 3\n" in t)
            assert not await tracker.bitmap_usable()
            (base,) = await tracker.full(points, "base")
            assert await tracker.bitmap_usable()

            previous = base
            for tag in ("p1", "p2"):
                seen = (await wait_log(tmp_path, lambda t: True)).count("seq ")
                await wait_log(tmp_path, lambda t, n=seen: t.count("seq ") >= n + 5)
                await channel.execute("stop")  # the disk holds still for the comparison
                # p1 writes data the guest never touches; p2 zeroes part of it, and
                # that zeroing must hide p1's data once p2 is linked onto it.
                io = "write -P 0x22 8M 128k" if tag == "p1" else "write -z 8M 64k"
                for command in (io, "flush"):  # flush: the compare reads the file
                    line = f'qemu-io -d vblk0/virtio-backend "{command}"'
                    await channel.execute("human-monitor-command", {"command-line": line})
                (delta,) = await tracker.delta(points, tag)
                # No backing file: the replica links it onto its previous point.
                assert "backing-filename" not in await qemu_img.info(delta)
                await qemu_img.rebase_unsafe(delta, previous)  # as the replica links it
                assert same_image(delta, disk)  # the chain is the disk at the delta's instant
                await channel.execute("cont")
                # only changed clusters: a few 64 KiB clusters for ~5 records
                assert 0 < allocated(delta) <= 16 * 64 * 1024
                scan = read_records(delta)
                assert scan.corrupt == 0 and scan.count == scan.last_seq >= 8
                previous = delta

    asyncio.run(scenario())
    assert allocated(points / "base-disk0.qcow2") < DISK_SIZE  # the full copy stays sparse


def test_bitmap_survives_a_clean_exit_and_not_a_kill(guest_spec: VmSpec, tmp_path: Path) -> None:
    points = tmp_path / "points"
    points.mkdir()

    async def start_tracking_then(end: str) -> bool:
        async with running_guest(guest_spec, tmp_path) as channel:
            tracker = ChangedBlockTracker(channel, guest_spec.disks, vm="cbt")
            await wait_log(tmp_path, lambda t: t.count("seq ") >= 2)
            if not await tracker.bitmap_usable():
                await tracker.full(points, f"base-{end}")
            if end == "quit":
                await channel.execute("quit")  # QEMU stores persistent bitmaps on close
                await asyncio.sleep(1)
            else:
                await qemu.kill_process(qemu.read_pidfile(tmp_path / "qemu.pid") or 0,
                                        guest_spec.uuid)  # fmt: skip
        async with running_guest(guest_spec, tmp_path) as channel:
            tracker = ChangedBlockTracker(channel, guest_spec.disks, vm="cbt")
            usable = await tracker.bitmap_usable()
            if not usable:  # after a kill: drop it and start over with a full copy
                await tracker.drop_bitmap()
                await tracker.full(points, f"again-{end}")
                assert await tracker.bitmap_usable()
            return usable

    assert asyncio.run(start_tracking_then("quit")) is True
    assert asyncio.run(start_tracking_then("kill")) is False


def test_outcome_of_a_backup_the_agent_lost_track_of(guest_spec: VmSpec, tmp_path: Path) -> None:
    """A concluded job is "ok" once (then cleaned up); no job at all is "unknown"."""
    points = tmp_path / "points"
    points.mkdir()

    async def scenario() -> None:
        async with running_guest(guest_spec, tmp_path) as channel:
            tracker = ChangedBlockTracker(channel, guest_spec.disks, vm="cbt")
            await wait_log(tmp_path, lambda t: t.count("seq ") >= 2)
            await tracker.full(points, "base")
            # What a cycle leaves when its agent dies right after the transaction.
            (target,) = tracker.targets(points, "p1")
            await qemu_img.create(target, guest_spec.disks[0].size)
            await channel.execute("blockdev-add", {
                "driver": "qcow2", "node-name": "cbt-lost-0",
                "file": {"driver": "file", "filename": str(target)}})  # fmt: skip
            await channel.execute("blockdev-backup", {
                "job-id": "cbt-lost-job0", "device": "disk0", "target": "cbt-lost-0",
                "sync": "incremental", "bitmap": "ferry-cbt", "auto-dismiss": False})  # fmt: skip
            for _ in range(100):
                verdict = await tracker.outcome("lost")
                if verdict != "running":
                    break
                await asyncio.sleep(0.1)
            assert verdict == "ok"
            nodes = {n["node-name"] for n in await channel.execute("query-named-block-nodes")}
            assert "cbt-lost-0" not in nodes  # cleaned up for the next cycle
            assert await tracker.outcome("lost") == "unknown"
            assert await tracker.bitmap_usable()

    asyncio.run(scenario())
