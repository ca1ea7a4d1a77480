"""Jobs: every long operation, persisted so a restarted agent can finish or undo it.

A job row is written before the job acts. Its ``detail`` holds what the
operation needs to recover (target host, storage mode) plus the progress the
CLI shows, so ``ferry job show`` and a restarted agent read the same truth;
``detail["history"]`` lists every state and phase the job entered, in order.

States change only through :mod:`ferry.core.jobs` (running, cancelling,
done, failed, cancelled), except for kinds that registered states of their
own (a move's phases, the incoming side of a move): their owner's table
decides those, and this registry stores them. A job whose state is not one of
the runner's (a move starts ``queued``) counts as such a kind too.

``ferry job cancel`` routes by kind: each service registers what cancelling
its kinds means (:meth:`JobRegistry.on_cancel`) or why they cannot be
cancelled (:meth:`JobRegistry.refuse_cancel`); the API only calls
:meth:`JobRegistry.cancel`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ferry.adapters.catalog import Catalog, JobRow
from ferry.core import jobs as table
from ferry.core import log_context
from ferry.core.jobs import JobState
from ferry.errors import (
    FerryError,
    InvalidInputError,
    JobCancelledError,
    NotFoundError,
    StateError,
)
from ferry.host.metrics.recorder import NO_METRICS, MetricEvents

log = logging.getLogger(__name__)

# Write progress to SQLite at most this often; phases are written at once.
PERSIST_EVERY_S = 2.0

_JOB_STATES = frozenset(s.value for s in JobState)


@dataclass
class Job:
    id: str
    kind: str
    vm_uuid: str
    vm_name: str
    state: str
    detail: dict[str, Any]
    created: float
    updated: float
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    persisted: float = 0.0

    def view(self, host: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "vm": self.vm_name,
            "vm_uuid": self.vm_uuid,
            "host": host,
            "state": self.state,
            "created": self.created,
            "updated": self.updated,
            **self.detail,
        }

    @property
    def history(self) -> list[tuple[str, str | None]]:
        """(state, phase) of every step the job took, oldest first."""
        return [(step["state"], step.get("phase")) for step in self.detail.get("history", [])]


CancelHandler = Callable[[Job], object]  # raises to refuse; what it returns is ignored
Refusal = str | Callable[[Job], str]


class JobRegistry:
    """This host's jobs, in memory and in the catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        self._jobs: dict[str, Job] = {}
        self._cancel: dict[str, CancelHandler] = {}
        self._refusals: dict[str, Refusal] = {}
        self._own_states: set[str] = set()
        self.metrics: MetricEvents = NO_METRICS  # hears every change of state (the agent's)
        for row in catalog.jobs():
            self._jobs[row.id] = Job(row.id, row.kind, row.vm_uuid, row.vm_name, row.state,
                                     json.loads(row.detail), row.created, row.updated)  # fmt: skip

    # -- kinds ---------------------------------------------------------------------

    def own_states(self, kind: str) -> None:
        """Jobs of ``kind`` have states of their own, decided by their owner's table."""
        self._own_states.add(kind)

    def on_cancel(self, kind: str, handler: CancelHandler) -> None:
        """``ferry job cancel`` of a ``kind`` job calls ``handler`` (it raises to refuse)."""
        self._cancel[kind] = handler

    def refuse_cancel(self, kind: str, why: Refusal) -> None:
        """Jobs of ``kind`` cannot be cancelled; ``why`` says so and what to do instead."""
        self._refusals[kind] = why

    # -- the life of a job -----------------------------------------------------------

    def create(self, kind: str, vm_uuid: str, vm_name: str, state: str, **detail: Any) -> Job:
        return self._new(uuidlib.uuid4().hex[:12], kind, vm_uuid, vm_name, state, detail)

    def adopt(self, job_id: str, kind: str, vm_uuid: str, vm_name: str, state: str,
              **detail: Any) -> Job:  # fmt: skip
        """Record a job whose id another host chose (the incoming side of a move)."""
        return self._new(job_id, kind, vm_uuid, vm_name, state, detail)

    def _new(self, job_id: str, kind: str, vm_uuid: str, vm_name: str, state: str,
             detail: dict[str, Any]) -> Job:  # fmt: skip
        now = time.time()
        job = Job(job_id, kind, vm_uuid, vm_name, state, dict(detail), now, now)
        self._note(job)
        self._jobs[job.id] = job
        self._persist(job)
        return job

    def turn_waiter(self, job: Job) -> Callable[[str | None], None]:
        """How a job queued behind another on a VM's disks says so (see host/turns.py).

        Its progress reads "waiting for ..." while it waits; ``waited_for``
        stays in the job afterwards, so its record shows why it took longer.
        """

        def waiting(why: str | None) -> None:
            if why:
                self.update(job, progress={"waiting": why}, waited_for=why)
            else:
                self.update(job, progress={})

        return waiting

    def update(self, job: Job, state: str | None = None, *, durable: bool = False,
               **detail: Any) -> None:  # fmt: skip
        """Record progress, a new phase (``phase=``) or a new state (through the table).

        ``durable``: written to the catalog now, as a new state is (a fact a restart
        must find, e.g. a move's hand-over), not only within ``PERSIST_EVERY_S``."""
        new_state = state is not None and state != job.state
        new_phase = "phase" in detail and detail["phase"] != job.detail.get("phase")
        if new_state and state is not None and self._follows_table(job):
            table.advance(JobState(job.state), state, job=job.id)
        if state is not None:
            job.state = state
        job.detail.update(detail)
        job.updated = time.time()
        if new_state or new_phase:
            self._note(job)
        if new_state:
            self.metrics.job_changed(job.kind, job.state, job.detail, job.updated - job.created)
        if durable or new_state or new_phase or job.updated - job.persisted >= PERSIST_EVERY_S:
            self._persist(job)

    def _follows_table(self, job: Job) -> bool:
        return job.kind not in self._own_states and job.state in _JOB_STATES

    def _note(self, job: Job) -> None:
        step = {"state": job.state, "phase": job.detail.get("phase"), "at": job.updated}
        job.detail["history"] = [*job.detail.get("history", []), step]

    def run(self, job: Job, work: Awaitable[Any], *,
            undo: Callable[[], Awaitable[Any]] | None = None) -> None:  # fmt: skip
        """Run ``work`` as the job's task; its result, error or cancellation ends the job.

        A cancel asked for with :meth:`request_cancel` stops the work at its
        next :meth:`checkpoint`; ``undo`` then puts things back before the job
        ends ``cancelled``. A job that reports phases ends in the phase named
        like its final state.
        """

        def end(state: JobState, **detail: Any) -> None:
            if "phase" in job.detail:
                detail["phase"] = state.value
            self.update(job, state.value, **detail)

        async def runner() -> None:
            log_context.bind(vm=job.vm_name, vm_uuid=job.vm_uuid, job=job.id, kind=job.kind)
            try:
                result = await work
            except asyncio.CancelledError:
                end(JobState.CANCELLED, error="cancelled by the admin")
                raise
            except JobCancelledError:
                try:
                    if undo is not None:
                        await undo()
                except FerryError as exc:
                    end(JobState.FAILED, error=f"cancelled, but undoing it failed: {exc}",
                        code=exc.code)  # fmt: skip
                else:
                    end(JobState.CANCELLED, error="cancelled by the admin")
            except FerryError as exc:
                end(JobState.FAILED, error=str(exc), code=exc.code)
            except Exception as exc:  # a bug: the job must still end, with the reason
                log.exception("job %s (%s) failed unexpectedly", job.id, job.kind)
                end(JobState.FAILED, error=f"internal error: {type(exc).__name__}: {exc}")
            else:
                end(JobState.DONE, result=result)

        job.task = asyncio.create_task(runner(), name=f"{job.kind}-{job.id}")

    # -- cancelling ------------------------------------------------------------------

    def cancel(self, job_id: str) -> Job:
        """``ferry job cancel``: what cancelling means is up to the job's kind."""
        job = self.get(job_id)
        handler = self._cancel.get(job.kind)
        if handler is None:
            why = self._refusals.get(job.kind, "ferry has no way to stop it")
            reason = why(job) if callable(why) else why
            raise InvalidInputError(f"job {job.id} ({job.kind} of VM {job.vm_name!r}) cannot be "
                                    f"cancelled: {reason}")  # fmt: skip
        handler(job)
        return job

    def _check_live(self, job: Job) -> None:
        if job.state not in (JobState.RUNNING, JobState.CANCELLING) or job.task is None:
            raise StateError(f"job {job.id} has already ended ({job.state})")

    def cancel_task(self, job: Job) -> None:
        """A cancel handler: stop the job's task now (its work undoes itself as it unwinds)."""
        self._check_live(job)
        assert job.task is not None
        job.task.cancel()

    def request_cancel(self, job: Job) -> None:
        """A cancel handler: the job stops at its next checkpoint and runs its undo."""
        self._check_live(job)
        if job.state == JobState.CANCELLING:
            return
        self.update(job, JobState.CANCELLING.value)
        log.info("job %s (%s of VM %s): cancel asked for", job.id, job.kind, job.vm_name)

    def checkpoint(self, job: Job) -> None:
        """A safe point of the job: raise JobCancelledError if its cancel was asked for."""
        if job.state == JobState.CANCELLING:
            raise JobCancelledError(f"job {job.id} was cancelled")

    # -- persistence and lookup ------------------------------------------------------

    def _persist(self, job: Job) -> None:
        job.persisted = time.time()
        self._catalog.put_job(JobRow(job.id, job.kind, job.vm_uuid, job.vm_name, job.state,
                                     json.dumps(job.detail), job.created, job.updated))  # fmt: skip

    def get(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise NotFoundError(f"no job {job_id!r} on this host") from None

    def find(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda job: job.created)


__all__ = ["Job", "JobRegistry", "JobState"]
