"""Block backup of a running VM: a point-in-time copy of its disks into qcow2 files.

DESIGN.md section 4 ("Changed-block tracking"), as QMP. One
:class:`BlockBackup` is one copy of some disk nodes (``disk0``, ``disk1``,
...) into target qcow2 files that already exist:

1. ``blockdev-add`` a qcow2 node on each target file (``{prefix}-{i}``);
2. one ``transaction`` of a ``blockdev-backup`` per disk (job
   ``{prefix}-job{i}``, ``auto-dismiss: false``), plus whatever actions must
   happen at the same instant (a new dirty bitmap). The transaction is the
   point in time for every disk. Across several disks ``completion-mode``
   is ``grouped``, so they fail or succeed as one; QEMU 7.2 refuses that
   next to ``block-dirty-bitmap-add``, so a copy that starts a bitmap runs
   its jobs individually;
3. wait until every job has concluded (``BLOCK_JOB_COMPLETED`` ends a wait
   at once; ``query-block-jobs`` is polled for progress) and check each
   job's ``error``;
4. clean up: dismiss the jobs and delete the target nodes.

Changed-block tracking (:mod:`ferry.adapters.cbt`) copies with ``sync:
full`` or ``incremental`` (the clusters a bitmap marks) and leaves a job
that is still running when the agent is stopped to finish, so a restarted
agent can read its outcome (:meth:`BlockBackup.outcome`). A live export
(``vm export --live``) copies ``sync: full`` into sparse targets and
cancels its jobs when it is cancelled.

The channel is the narrow QMP interface (:class:`ferry.adapters.qemu.QmpChannel`
for real; :class:`ferry.testing.qmp.FakeQmp` in the unit tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from enum import StrEnum
from pathlib import Path
from typing import Any

from ferry.adapters.migration.channel import Channel
from ferry.errors import FerryError, QemuError

JOB_POLL_S = 0.2


class Sync(StrEnum):
    FULL = "full"  # every allocated cluster
    INCREMENTAL = "incremental"  # only the clusters the bitmap marks


class Outcome(StrEnum):
    """What became of a backup the agent lost track of (see :meth:`BlockBackup.outcome`)."""

    OK = "ok"
    FAILED = "failed"
    RUNNING = "running"
    UNKNOWN = "unknown"


class BlockBackup:
    """One backup of ``devices`` (disk node names), its nodes and jobs named by ``prefix``."""

    def __init__(self, channel: Channel, prefix: str, devices: Sequence[str], *,
                 what: str) -> None:  # fmt: skip
        self.channel = channel
        self.devices = list(devices)
        self.nodes = [f"{prefix}-{i}" for i in range(len(self.devices))]
        self.jobs = [f"{prefix}-job{i}" for i in range(len(self.devices))]
        self.what = what  # "backup of VM 'web'": how errors name this copy

    async def run(
        self,
        targets: Sequence[Path],
        *,
        sync: Sync,
        bitmap: str | None = None,
        also: Sequence[dict[str, Any]] = (),
        sparse: bool = False,
        speed: int | None = None,
        progress: Callable[[int], None] | None = None,
        cancel_on_exit: bool = True,
        cut: AbstractAsyncContextManager[object] | None = None,
    ) -> None:
        """Copy each device into its target; QemuError if any job failed.

        ``bitmap``: the dirty bitmap an incremental copy reads (and clears on
        success). ``also``: transaction actions taken at the same instant.
        ``sparse``: zeros written as holes (``detect-zeroes: unmap``); a
        delta must not, since its zero clusters hide older data. ``speed``:
        bytes/s for the whole copy, shared by the jobs. ``progress``: called
        with the bytes copied so far. ``cancel_on_exit``: False leaves jobs
        that still run when this is cancelled to finish inside QEMU.
        ``cut``: entered just before the transaction (the point in time) and
        left once it returned, before the copy runs: a guest frozen for the
        cut stays frozen for the transaction alone.
        """
        if len(targets) != len(self.devices):
            raise ValueError(f"{len(self.devices)} devices, {len(targets)} targets")
        if sync is Sync.INCREMENTAL and bitmap is None:
            raise ValueError("an incremental backup reads a bitmap")
        finished = closed = False
        try:
            for node, path in zip(self.nodes, targets, strict=True):
                node_args: dict[str, Any] = {
                    "driver": "qcow2", "node-name": node,
                    "file": {"driver": "file", "filename": str(path)}}  # fmt: skip
                if sparse:
                    node_args.update({"discard": "unmap", "detect-zeroes": "unmap"})
                await self.channel.execute("blockdev-add", node_args)
            actions = list(also)
            for device, node, job in zip(self.devices, self.nodes, self.jobs, strict=True):
                data: dict[str, Any] = {"job-id": job, "device": device, "target": node,
                                        "sync": sync.value, "auto-dismiss": False}  # fmt: skip
                if bitmap is not None and sync is Sync.INCREMENTAL:
                    data["bitmap"] = bitmap
                if speed:
                    data["speed"] = max(1, speed // len(self.jobs))
                actions.append({"type": "blockdev-backup", "data": data})
            grouped = not any(a["type"] == "block-dirty-bitmap-add" for a in actions)
            with self.channel.listen("BLOCK_JOB_COMPLETED", "JOB_STATUS_CHANGE") as events:
                async with cut or contextlib.nullcontext():
                    await self.channel.execute("transaction", {
                        "actions": actions,
                        "properties": {"completion-mode": "grouped" if grouped else "individual"},
                    })  # fmt: skip
                while True:
                    states = await self._states()
                    if progress is not None:
                        progress(sum(int(j.get("offset", 0)) for j in states.values()))
                    if len(states) == len(self.jobs) and all(
                        j["status"] == "concluded" for j in states.values()
                    ):
                        break
                    await events.next(JOB_POLL_S)
            finished = True
            errors = [j["error"] for j in states.values() if j.get("error")]
            if errors:
                raise QemuError(f"{self.what} failed: {errors[0]}")
            await self.cleanup(strict=True)
            closed = True
        finally:
            if not finished and cancel_on_exit:
                await self._cancel()
            if not closed:
                await self.cleanup()

    async def outcome(self) -> Outcome:
        """What became of this backup after the agent lost track of it.

        ``ok`` (every job concluded without error: the files are whole and an
        incremental copy's bitmap bits are cleared), ``failed`` (QEMU merged
        the bits back), ``running``, or ``unknown`` (no such jobs: QEMU
        restarted, or they were dismissed). Concluded jobs and the target
        nodes are cleaned up.
        """
        found = list((await self._states()).values())
        if any(j["status"] != "concluded" for j in found):
            return Outcome.RUNNING
        if len(found) != len(self.jobs):
            verdict = Outcome.UNKNOWN
        else:
            verdict = Outcome.FAILED if any(j.get("error") for j in found) else Outcome.OK
        await self.cleanup()
        return verdict

    async def cleanup(self, *, strict: bool = False) -> None:
        """Dismiss the concluded jobs and delete the target nodes (each step may fail).

        ``strict`` (a copy that succeeded): a failure raises. A target is whole
        only once its node is closed: a concluded job's data may sit in QEMU's
        qcow2 metadata cache of the target (L2 tables, refcounts, written back
        at the close), so a QEMU that dies between the jobs' end and the close
        leaves target files whose newest clusters read as unallocated: a
        recovery point without the guest's last writes (the long fault suite
        lost 3 records so, a planned failover's QEMU killed at the end of its
        final cycle). So the close is part of the copy.
        """
        for job in self.jobs:
            with contextlib.suppress(*(() if strict else (FerryError,))):
                await self.channel.execute("job-dismiss", {"id": job})
        for node in self.nodes:
            try:
                await self.channel.execute("blockdev-del", {"node-name": node})
            except FerryError as exc:
                if strict:
                    raise QemuError(f"{self.what} could not close its copy, so it may not "
                                    f"be whole: {exc}") from exc  # fmt: skip

    async def _cancel(self) -> None:
        for job in self.jobs:
            with contextlib.suppress(FerryError):
                await self.channel.execute("block-job-cancel", {"device": job, "force": True})
        # A cancelled job concludes shortly after; dismissing it before then fails.
        for _ in range(50):
            states = await self._states()
            if all(j["status"] == "concluded" for j in states.values()):
                return
            with self.channel.listen("BLOCK_JOB_CANCELLED", "JOB_STATUS_CHANGE") as events:
                await events.next(JOB_POLL_S)

    async def _states(self) -> dict[str, dict[str, Any]]:
        """This backup's jobs as ``query-block-jobs`` lists them, by job id."""
        wanted = set(self.jobs)
        jobs = await self.channel.execute("query-block-jobs")
        return {j["device"]: j for j in jobs if j["device"] in wanted}
