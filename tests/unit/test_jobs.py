"""The job life cycle (ferry.core.jobs) and the job runner and registry (ferry.host.jobs)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.adapters.catalog import Catalog
from ferry.core import jobs as table
from ferry.core.jobs import TRANSITIONS, JobOp, JobState
from ferry.errors import ConflictError, InvalidInputError, StateError
from ferry.host import jobs as jobs_module
from ferry.host.jobs import Job, JobRegistry

S = JobState

ALLOWED = {
    (S.RUNNING, JobOp.CANCEL): S.CANCELLING,
    (S.RUNNING, JobOp.FINISH): S.DONE,
    (S.RUNNING, JobOp.FAIL): S.FAILED,
    (S.RUNNING, JobOp.STOP): S.CANCELLED,
    (S.CANCELLING, JobOp.FINISH): S.DONE,
    (S.CANCELLING, JobOp.FAIL): S.FAILED,
    (S.CANCELLING, JobOp.STOP): S.CANCELLED,
}


@pytest.mark.parametrize(("state", "op"), list(itertools.product(S, JobOp)))
def test_every_operation_from_every_state(state: JobState, op: JobOp) -> None:
    if (state, op) in ALLOWED:
        assert table.apply(state, op, job="j1") is ALLOWED[(state, op)]
        return
    with pytest.raises(StateError) as info:
        table.apply(state, op, job="j1")
    assert info.value.state is state and info.value.op is op
    assert set(info.value.required) == TRANSITIONS[op][0]
    assert str(info.value).startswith(f"cannot {op.value} job j1: it is {state.value}")


def test_a_final_state_is_never_left() -> None:
    for final in table.FINAL:
        assert table.is_final(final)
        for target in S:
            with pytest.raises(StateError):
                table.advance(final, target.value, job="j1")
    with pytest.raises(StateError, match="no operation leads there"):
        table.advance(S.RUNNING, "queued", job="j1")
    assert table.advance(S.RUNNING, "cancelling") is S.CANCELLING


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[JobRegistry]:
    monkeypatch.setattr(jobs_module, "PERSIST_EVERY_S", 0.0)
    catalog = Catalog(tmp_path)
    yield JobRegistry(catalog)
    catalog.close()


def _job(registry: JobRegistry, kind: str = "export") -> Job:
    return registry.create(kind, "u-1", "web", "running", phase="starting")


def _run(registry: JobRegistry, job: Job, work: object, **kw: object) -> Job:
    async def go() -> None:
        registry.run(job, work, **kw)  # type: ignore[arg-type]
        assert job.task is not None
        with contextlib.suppress(asyncio.CancelledError):
            await job.task

    asyncio.run(go())
    return job


def test_the_runner_ends_a_job_done_with_its_result(registry: JobRegistry) -> None:
    job = _job(registry)

    async def work() -> dict[str, int]:
        registry.update(job, phase="copying")
        registry.update(job, progress={"bytes": 1})  # progress is no step of its own
        return {"bytes": 1}

    _run(registry, job, work())
    assert (job.state, job.detail["result"], job.detail["phase"]) == ("done", {"bytes": 1},
                                                                       "done")  # fmt: skip
    assert job.history == [("running", "starting"), ("running", "copying"), ("done", "done")]


def test_an_error_fails_the_job_with_its_code_and_a_bug_says_so(registry: JobRegistry) -> None:
    job = _job(registry)

    async def refused() -> None:
        raise ConflictError("VM 'web' is in use")

    _run(registry, job, refused())
    assert (job.state, job.detail["error"], job.detail["code"]) == (
        "failed", "VM 'web' is in use", "conflict")  # fmt: skip

    job = _job(registry)

    async def bug() -> None:
        raise KeyError("oops")

    _run(registry, job, bug())
    assert job.state == "failed" and job.detail["error"].startswith("internal error: KeyError")


def test_a_cancelled_task_ends_the_job_cancelled(registry: JobRegistry) -> None:
    job = _job(registry)
    registry.on_cancel("export", registry.cancel_task)

    async def go() -> None:
        async def forever() -> None:
            await asyncio.Event().wait()

        registry.run(job, forever())
        await asyncio.sleep(0)
        registry.cancel(job.id)
        assert job.task is not None
        with pytest.raises(asyncio.CancelledError):
            await job.task

    asyncio.run(go())
    assert (job.state, job.detail["error"]) == ("cancelled", "cancelled by the admin")
    with pytest.raises(StateError, match="has already ended"):
        registry.cancel(job.id)


def _stoppable(registry: JobRegistry, job: Job, undone: list[str], *,
               undo_fails: bool = False) -> tuple[asyncio.Event, object, object]:  # fmt: skip
    """Work that waits for ``go`` at its first checkpoint, and its undo."""
    go = asyncio.Event()

    async def work() -> str:
        await go.wait()
        registry.checkpoint(job)
        registry.update(job, phase="second")
        return "finished"

    async def undo() -> None:
        undone.append("undo")
        if undo_fails:
            raise ConflictError("the undo failed")

    return go, work(), undo


def test_a_cancel_request_stops_at_the_checkpoint_and_undoes(registry: JobRegistry) -> None:
    job = _job(registry, "failover-test")
    registry.on_cancel("failover-test", registry.request_cancel)
    undone: list[str] = []

    async def run() -> None:
        go, work, undo = _stoppable(registry, job, undone)
        registry.run(job, work, undo=undo)  # type: ignore[arg-type]
        await asyncio.sleep(0)
        registry.cancel(job.id)
        assert job.state == "cancelling"
        registry.cancel(job.id)  # asked twice: one request
        go.set()
        assert job.task is not None
        await job.task

    asyncio.run(run())
    assert undone == ["undo"]
    assert job.history == [("running", "starting"), ("cancelling", "starting"),
                           ("cancelled", "cancelled")]  # fmt: skip


def test_an_undo_that_fails_fails_the_job(registry: JobRegistry) -> None:
    job = _job(registry, "failover-test")
    undone: list[str] = []

    async def run() -> None:
        go, work, undo = _stoppable(registry, job, undone, undo_fails=True)
        registry.run(job, work, undo=undo)  # type: ignore[arg-type]
        registry.request_cancel(job)
        go.set()
        assert job.task is not None
        await job.task

    asyncio.run(run())
    assert job.state == "failed"
    assert job.detail["error"] == "cancelled, but undoing it failed: the undo failed"


def test_cancel_routes_by_kind_and_a_kind_without_a_handler_says_why(
    registry: JobRegistry,
) -> None:
    seen: list[str] = []
    registry.on_cancel("move", lambda job: seen.append(job.id))
    registry.refuse_cancel("incoming", lambda job: f"cancel it on host {job.detail['source']}")
    registry.refuse_cancel("replication-initial", "pause replication instead")
    move = registry.create("move", "u-1", "web", "queued")
    assert registry.cancel(move.id) is move and seen == [move.id]
    incoming = registry.create("incoming", "u-1", "web", "receiving", source="host-1")
    with pytest.raises(InvalidInputError) as info:
        registry.cancel(incoming.id)
    assert str(info.value) == (f"job {incoming.id} (incoming of VM 'web') cannot be cancelled: "
                               "cancel it on host host-1")  # fmt: skip
    copy = registry.create("replication-initial", "u-1", "web", "running")
    with pytest.raises(InvalidInputError, match="cannot be cancelled: pause replication"):
        registry.cancel(copy.id)
    other = registry.create("something-new", "u-1", "web", "running")
    with pytest.raises(InvalidInputError, match="ferry has no way to stop it"):
        registry.cancel(other.id)


def test_states_go_through_the_table_unless_the_kind_has_its_own(registry: JobRegistry) -> None:
    job = _job(registry)
    registry.update(job, "done")
    with pytest.raises(StateError, match="cannot fail job"):
        registry.update(job, "failed")
    assert job.state == "done"
    registry.own_states("move")
    move = registry.create("move", "u-1", "web", "queued")
    for phase in ("preparing", "copying-memory", "done"):
        registry.update(move, phase, phase=phase)  # the move's own table decided these
    assert move.state == "done"


def test_jobs_and_their_history_survive_a_restart(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path)
    registry = JobRegistry(catalog)
    job = registry.create("export", "u-1", "web", "running", phase="starting")
    registry.update(job, phase="copying")
    registry.update(job, "failed", error="the agent restarted during the job")
    catalog.close()
    catalog = Catalog(tmp_path)
    again = JobRegistry(catalog).get(job.id)
    assert again.history == [("running", "starting"), ("running", "copying"),
                             ("failed", "copying")]  # fmt: skip
    assert again.view("host-1")["history"][0]["state"] == "running"
    catalog.close()
