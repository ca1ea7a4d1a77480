"""Changed-block tracking on a running VM: the primary side of a replication cycle.

DESIGN.md section 4 ("Changed-block tracking (push)"), as QMP:

* cycle 0 (:meth:`ChangedBlockTracker.full`): in one transaction, add a
  persistent dirty bitmap to every disk and start a full backup of each into a
  new qcow2. The transaction is the point in time.
* cycle N (:meth:`ChangedBlockTracker.delta`): create ``incN.qcow2`` backed by
  the previous point's file (so clusters the delta does not hold read through),
  and in one transaction back up only the clusters the bitmap marks
  (``sync: incremental``), ``completion-mode: grouped`` across disks. QEMU
  freezes the bitmap at the transaction and records new writes in a
  successor; on success the copied bits clear, on failure everything merges
  back, so a failed cycle loses no change and a retry into a fresh file works.
* :meth:`ChangedBlockTracker.bitmap_usable`: after QEMU was killed a
  persistent bitmap comes back ``inconsistent`` (or is missing): the
  relationship must resynchronise instead.

Targets are qcow2 nodes added with ``blockdev-add`` and removed afterwards;
job and node names carry a per-cycle tag so two cycles never collide.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ferry.adapters import qemu_img
from ferry.adapters.qemu import QmpChannel
from ferry.core.spec import DiskSpec
from ferry.errors import FerryError, QemuError

BITMAP = "ferry-cbt"
JOB_POLL_S = 0.2


class ChangedBlockTracker:
    """Takes point-in-time full copies and deltas of one VM's disks."""

    def __init__(self, channel: QmpChannel, disks: Sequence[DiskSpec], *, vm: str,
                 qemu_img_bin: str = "qemu-img") -> None:  # fmt: skip
        self.channel = channel
        self.disks = list(disks)
        self.vm = vm
        self.qemu_img = qemu_img_bin

    async def bitmap_usable(self) -> bool:
        """True if every disk carries a consistent ``ferry-cbt`` bitmap."""
        found: dict[str, dict[str, Any]] = {}
        for device in await self.channel.execute("query-block"):
            inserted = device.get("inserted") or {}
            node = str(inserted.get("node-name"))
            for bitmap in inserted.get("dirty-bitmaps") or []:
                if bitmap.get("name") == BITMAP:
                    found[node] = bitmap
        for index in range(len(self.disks)):
            bitmap = found.get(f"disk{index}")
            if bitmap is None or bitmap.get("inconsistent"):
                return False
        return True

    async def drop_bitmap(self) -> None:
        """Remove the bitmap (e.g. an inconsistent one) so tracking can start again."""
        for index in range(len(self.disks)):
            with contextlib.suppress(QemuError):
                await self.channel.execute(
                    "block-dirty-bitmap-remove", {"node": f"disk{index}", "name": BITMAP}
                )

    async def full(self, out_dir: Path, tag: str) -> list[Path]:
        """Cycle 0: start tracking and copy every disk as of now into ``out_dir``."""
        await self.drop_bitmap()  # a failed or abandoned earlier start leaves one behind
        targets = [out_dir / f"base-disk{i}.qcow2" for i in range(len(self.disks))]
        for disk, path in zip(self.disks, targets, strict=True):
            await qemu_img.create(path, disk.size, qemu_img=self.qemu_img)
        actions: list[dict[str, Any]] = [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": f"disk{i}", "name": BITMAP, "persistent": True}}
            for i in range(len(self.disks))
        ]  # fmt: skip
        await self._backup(targets, actions, sync="full", tag=tag)
        return targets

    async def delta(self, previous: Sequence[Path], out_dir: Path, tag: str) -> list[Path]:
        """Cycle N: the clusters changed since the last cycle, as overlays on ``previous``."""
        if len(previous) != len(self.disks):
            raise FerryError(f"VM {self.vm!r} has {len(self.disks)} disks, not {len(previous)}")
        targets = [out_dir / f"{tag}-disk{i}.qcow2" for i in range(len(self.disks))]
        for disk, backing, path in zip(self.disks, previous, targets, strict=True):
            await qemu_img.create_overlay(path, backing, disk.size, qemu_img=self.qemu_img)
        await self._backup(targets, [], sync="incremental", tag=tag)
        return targets

    async def _backup(self, targets: list[Path], actions: list[dict[str, Any]], *,
                      sync: str, tag: str) -> None:  # fmt: skip
        nodes = [f"cbt-{tag}-{i}" for i in range(len(targets))]
        jobs = [f"cbt-{tag}-job{i}" for i in range(len(targets))]
        added: list[str] = []
        try:
            for node, path in zip(nodes, targets, strict=True):
                await self.channel.execute("blockdev-add", {
                    "driver": "qcow2", "node-name": node,
                    "file": {"driver": "file", "filename": str(path)}})  # fmt: skip
                added.append(node)
            for i, (node, job) in enumerate(zip(nodes, jobs, strict=True)):
                data: dict[str, Any] = {"job-id": job, "device": f"disk{i}", "target": node,
                                        "sync": sync, "auto-dismiss": False}  # fmt: skip
                if sync == "incremental":
                    data["bitmap"] = BITMAP
                actions.append({"type": "blockdev-backup", "data": data})
            with self.channel.listen("BLOCK_JOB_COMPLETED", "JOB_STATUS_CHANGE") as events:
                # QEMU 7.2 refuses "grouped" next to block-dirty-bitmap-add, so only
                # the deltas fail or succeed as one across disks.
                mode = "grouped" if sync == "incremental" else "individual"
                await self.channel.execute("transaction", {
                    "actions": actions, "properties": {"completion-mode": mode}})  # fmt: skip
                while True:
                    states = {j["device"]: j for j in await self.channel.execute("query-block-jobs")
                              if j["device"] in jobs}  # fmt: skip
                    if len(states) == len(jobs) and all(
                        j["status"] == "concluded" for j in states.values()
                    ):
                        break
                    await events.next(JOB_POLL_S)
            errors = [j["error"] for j in states.values() if j.get("error")]
            if errors:
                raise QemuError(f"backup of VM {self.vm!r} failed: {errors[0]}")
        finally:
            for job in jobs:
                with contextlib.suppress(FerryError):
                    await self.channel.execute("job-dismiss", {"id": job})
            for node in added:
                with contextlib.suppress(FerryError):
                    await self.channel.execute("blockdev-del", {"node-name": node})
