"""The block-backup adapter against a scripted QMP channel: the exact QMP it sends."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from ferry.adapters.backup import BlockBackup, Outcome, Sync
from ferry.errors import QemuError
from ferry.testing.qmp import FakeQmp

TARGETS = [Path("/d/p1-disk0.qcow2"), Path("/d/p1-disk1.qcow2")]
ADD_BITMAP = {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "cbt"}}


def _qemu(*, error: str | None = None, finish: bool = True) -> FakeQmp:
    """A QEMU whose backup jobs conclude at once (or never), the first with ``error``."""
    qmp = FakeQmp("web")
    jobs: list[dict[str, Any]] = []

    def transaction(args: dict[str, Any] | None) -> dict[str, Any]:
        assert args is not None
        qmp.emit("TEST_TRANSACTION")  # tells a test the jobs exist now
        for action in args["actions"]:
            if action["type"] == "blockdev-backup":
                job = {"device": action["data"]["job-id"], "status": "running", "offset": 0}
                jobs.append(job)
        if finish:
            for i, job in enumerate(jobs):
                job.update(status="concluded", offset=1 << 20)
                if error and i == 0:
                    job["error"] = error
                qmp.emit("BLOCK_JOB_COMPLETED", {"device": job["device"]})
        return {}

    def cancel(args: dict[str, Any] | None) -> dict[str, Any]:
        for job in jobs:
            if args and job["device"] == args["device"]:
                job.update(status="concluded", error="operation canceled")
        return {}

    qmp.on("transaction", transaction)
    qmp.on("query-block-jobs", lambda _: [dict(j) for j in jobs])
    qmp.on("block-job-cancel", cancel)
    return qmp


def _backup(qmp: FakeQmp) -> BlockBackup:
    return BlockBackup(qmp, "cbt-t1", ["disk0", "disk1"], what="backup of VM 'web'")


def test_an_incremental_copy_of_two_disks_is_one_grouped_transaction() -> None:
    qmp = _qemu()
    seen: list[int] = []
    asyncio.run(_backup(qmp).run(TARGETS, sync=Sync.INCREMENTAL, bitmap="cbt",
                                 speed=100, progress=seen.append))  # fmt: skip
    cleanup = ["job-dismiss", "job-dismiss", "blockdev-del", "blockdev-del"]
    assert qmp.actions() == ["blockdev-add", "blockdev-add", "transaction", *cleanup]
    nodes = qmp.arguments("blockdev-add")
    assert [n["node-name"] for n in nodes if n] == ["cbt-t1-0", "cbt-t1-1"]
    assert all(n and "detect-zeroes" not in n for n in nodes)  # a delta keeps its zeros
    (transaction,) = qmp.arguments("transaction")
    assert transaction is not None
    assert transaction["properties"] == {"completion-mode": "grouped"}
    data = [a["data"] for a in transaction["actions"]]
    assert [(d["job-id"], d["device"], d["target"]) for d in data] == [
        ("cbt-t1-job0", "disk0", "cbt-t1-0"), ("cbt-t1-job1", "disk1", "cbt-t1-1")]  # fmt: skip
    assert all(d["sync"] == "incremental" and d["bitmap"] == "cbt" for d in data)
    assert all(d["speed"] == 50 and d["auto-dismiss"] is False for d in data)
    assert seen[-1] == 2 << 20
    assert [a and a["id"] for a in qmp.arguments("job-dismiss")] == ["cbt-t1-job0", "cbt-t1-job1"]


def test_a_copy_that_starts_a_bitmap_runs_its_jobs_individually() -> None:
    qmp = _qemu()
    asyncio.run(_backup(qmp).run(TARGETS, sync=Sync.FULL, also=[ADD_BITMAP], sparse=True))
    (transaction,) = qmp.arguments("transaction")
    assert transaction is not None
    assert transaction["properties"] == {"completion-mode": "individual"}
    assert transaction["actions"][0] == ADD_BITMAP  # at the same instant as the copies
    assert all("bitmap" not in a["data"] for a in transaction["actions"][1:])
    nodes = qmp.arguments("blockdev-add")
    assert all(n and n["detect-zeroes"] == "unmap" and n["discard"] == "unmap" for n in nodes)


def test_a_failed_job_fails_the_copy_and_everything_is_cleaned_up() -> None:
    qmp = _qemu(error="No space left on device")
    with pytest.raises(QemuError, match="backup of VM 'web' failed: No space left on device"):
        asyncio.run(_backup(qmp).run(TARGETS, sync=Sync.FULL))
    assert qmp.actions()[-4:] == ["job-dismiss", "job-dismiss", "blockdev-del", "blockdev-del"]
    assert "block-job-cancel" not in qmp.actions()  # the jobs had ended


def test_a_copy_is_whole_only_once_its_targets_closed() -> None:
    """The jobs concluded, then QEMU went before the target nodes were closed: the
    targets' newest qcow2 metadata may never have reached the files, so the copy fails."""
    qmp = _qemu()
    qmp.fail("blockdev-del", "Disconnected")
    with pytest.raises(QemuError, match="backup of VM 'web' could not close its copy, so it "
                       "may not be whole"):  # fmt: skip
        asyncio.run(_backup(qmp).run(TARGETS, sync=Sync.INCREMENTAL, bitmap="cbt"))


@pytest.mark.parametrize("cancel_on_exit", [True, False])
def test_a_cancelled_copy_cancels_its_jobs_or_leaves_them(cancel_on_exit: bool) -> None:
    qmp = _qemu(finish=False)

    async def run() -> None:
        with qmp.listen("TEST_TRANSACTION") as started:
            copy = _backup(qmp).run(TARGETS, sync=Sync.FULL, cancel_on_exit=cancel_on_exit)
            task = asyncio.ensure_future(copy)
            assert await started.next(5) is not None
        await asyncio.sleep(0.05)  # the copy now waits for its jobs
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    cancelled = [a and a["device"] for a in qmp.arguments("block-job-cancel")]
    assert cancelled == (["cbt-t1-job0", "cbt-t1-job1"] if cancel_on_exit else [])
    assert "blockdev-del" in qmp.actions()  # cleanup is tried either way


def test_the_outcome_after_a_restart() -> None:
    def outcome(jobs: list[dict[str, Any]]) -> tuple[Outcome, list[str]]:
        qmp = FakeQmp()
        qmp.reply("query-block-jobs", jobs)
        verdict = asyncio.run(_backup(qmp).outcome())
        return verdict, qmp.actions()

    done = [{"device": f"cbt-t1-job{i}", "status": "concluded"} for i in (0, 1)]
    assert outcome(done) == (Outcome.OK, ["job-dismiss"] * 2 + ["blockdev-del"] * 2)
    failed = [done[0], {**done[1], "error": "I/O error"}]
    assert outcome(failed)[0] is Outcome.FAILED
    assert outcome([done[0]])[0] is Outcome.UNKNOWN  # one job gone: QEMU cannot tell
    assert outcome([])[0] is Outcome.UNKNOWN
    running = [done[0], {**done[1], "status": "running"}]
    assert outcome(running) == (Outcome.RUNNING, [])  # nothing is touched while it runs
    other = [{"device": "cbt-t9-job0", "status": "running"}]
    assert outcome(other + done)[0] is Outcome.OK  # another backup's jobs do not count
