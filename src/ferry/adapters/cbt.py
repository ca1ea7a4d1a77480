"""Changed-block tracking on a running VM: the primary side of a replication cycle.

DESIGN.md section 4 ("Changed-block tracking (push)"); the copies themselves
are :class:`ferry.adapters.backup.BlockBackup`:

* cycle 0 (:meth:`ChangedBlockTracker.full`): in one transaction, add a
  persistent dirty bitmap to every disk and start a full backup of each into a
  new qcow2. The transaction is the point in time.
* cycle N (:meth:`ChangedBlockTracker.delta`): create ``incN.qcow2`` (no
  backing file: see :meth:`~ChangedBlockTracker.delta` for why none is needed)
  and in one transaction back up only the clusters the bitmap marks
  (``sync: incremental``), ``completion-mode: grouped`` across disks. QEMU
  freezes the bitmap at the transaction and records new writes in a
  successor; on success the copied bits clear, on failure everything merges
  back, so a failed cycle loses no change and a retry into a fresh file works.
* :meth:`ChangedBlockTracker.bitmap_usable`: after QEMU was killed a
  persistent bitmap comes back ``inconsistent`` (or is missing): the
  relationship must resynchronise instead.

Job and node names carry a per-cycle tag so two cycles never collide. A
backup still running when the agent stops is left to finish: a restarted
agent reads its outcome (:meth:`ChangedBlockTracker.outcome`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from ferry.adapters import qemu_img
from ferry.adapters.backup import BlockBackup, Sync
from ferry.adapters.qemu import QmpChannel
from ferry.core.spec import DiskSpec
from ferry.errors import QemuError

BITMAP = "ferry-cbt"
GRANULARITY = 64 * 1024  # = the qcow2 cluster size of the delta files
# Held around the transaction that is the point in time (a guest's freeze).
Cut = AbstractAsyncContextManager[object]


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

    async def full(self, out_dir: Path, stem: str, *, tag: str | None = None,
                   cut: Cut | None = None) -> list[Path]:  # fmt: skip
        """Cycle 0: start tracking and copy every disk as of now into ``out_dir``.

        Also the start of a resynchronisation: any old bitmap is dropped and a
        new one starts at the same instant as the copy.
        """
        await self.drop_bitmap()  # a failed or abandoned earlier start leaves one behind
        targets = self.targets(out_dir, stem)
        for disk, path in zip(self.disks, targets, strict=True):
            await qemu_img.create(path, disk.size, qemu_img=self.qemu_img)
        actions: list[dict[str, Any]] = [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": f"disk{i}", "name": BITMAP, "persistent": True,
                      "granularity": GRANULARITY}}
            for i in range(len(self.disks))
        ]  # fmt: skip
        # The bitmap starts at the same instant as the copy.
        await self._backup(tag or stem).run(targets, sync=Sync.FULL, also=actions,
                                            cancel_on_exit=False, cut=cut)  # fmt: skip
        return targets

    async def delta(self, out_dir: Path, stem: str, *, tag: str | None = None,
                    cut: Cut | None = None) -> list[Path]:  # fmt: skip
        """Cycle N: the clusters changed since the last cycle, one qcow2 per disk.

        The files have no backing file: the bitmap's granularity equals the
        qcow2 cluster size (64 KiB), so the backup writes whole clusters and
        never reads a backing file for a partial one. The replica links each
        file onto its previous point with ``qemu-img rebase -u``.
        """
        targets = self.targets(out_dir, stem)
        for disk, path in zip(self.disks, targets, strict=True):
            await qemu_img.create(path, disk.size, qemu_img=self.qemu_img)
        await self._backup(tag or stem).run(targets, sync=Sync.INCREMENTAL, bitmap=BITMAP,
                                            cancel_on_exit=False, cut=cut)  # fmt: skip
        return targets

    def targets(self, out_dir: Path, stem: str) -> list[Path]:
        """``{stem}-disk{i}.qcow2``: the files a copy into ``out_dir`` writes."""
        return [out_dir / f"{stem}-disk{i}.qcow2" for i in range(len(self.disks))]

    async def outcome(self, tag: str) -> str:
        """What became of the backup ``tag`` after the agent lost track of it.

        ``ok``, ``failed``, ``running`` or ``unknown``: see
        :meth:`ferry.adapters.backup.BlockBackup.outcome`.
        """
        return (await self._backup(tag).outcome()).value

    def _backup(self, tag: str) -> BlockBackup:
        # The names are part of the catalog's record of a cycle in flight: a
        # restarted agent finds the jobs by them.
        return BlockBackup(self.channel, f"cbt-{tag}", [f"disk{i}" for i in range(len(self.disks))],
                           what=f"backup of VM {self.vm!r}")  # fmt: skip
