"""Jobs: every long operation, persisted so a restarted agent can finish or undo it.

A job row is written before the job acts. Its ``detail`` holds what the
operation needs to recover (target host, storage mode) plus the progress the
CLI shows, so ``ferry job show`` and a restarted agent read the same truth.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid as uuidlib
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from ferry.adapters.catalog import Catalog, JobRow
from ferry.errors import FerryError, NotFoundError

log = logging.getLogger(__name__)

# Write progress to SQLite at most this often; phases are written at once.
PERSIST_EVERY_S = 2.0


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


class JobRegistry:
    """This host's jobs, in memory and in the catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        self._jobs: dict[str, Job] = {}
        for row in catalog.jobs():
            self._jobs[row.id] = Job(row.id, row.kind, row.vm_uuid, row.vm_name, row.state,
                                     json.loads(row.detail), row.created, row.updated)  # fmt: skip

    def create(self, kind: str, vm_uuid: str, vm_name: str, state: str, **detail: Any) -> Job:
        now = time.time()
        job = Job(uuidlib.uuid4().hex[:12], kind, vm_uuid, vm_name, state, dict(detail), now, now)
        self._jobs[job.id] = job
        self._persist(job)
        return job

    def adopt(self, job_id: str, kind: str, vm_uuid: str, vm_name: str, state: str,
              **detail: Any) -> Job:  # fmt: skip
        """Record a job whose id another host chose (the incoming side of a move)."""
        now = time.time()
        job = Job(job_id, kind, vm_uuid, vm_name, state, dict(detail), now, now)
        self._jobs[job.id] = job
        self._persist(job)
        return job

    def update(self, job: Job, state: str | None = None, **detail: Any) -> None:
        changed_state = (state is not None and state != job.state) or (
            "phase" in detail and detail["phase"] != job.detail.get("phase")
        )
        if state is not None:
            job.state = state
        job.detail.update(detail)
        job.updated = time.time()
        if changed_state or job.updated - job.persisted >= PERSIST_EVERY_S:
            self._persist(job)

    def run(self, job: Job, work: Awaitable[Any]) -> None:
        """Run ``work`` as the job's task; its result, error or cancellation ends the job.

        A job that reports phases ends in the phase named like its final state.
        """

        def end(state: str, **detail: Any) -> None:
            if "phase" in job.detail:
                detail["phase"] = state
            self.update(job, state, **detail)

        async def runner() -> None:
            try:
                result = await work
            except asyncio.CancelledError:
                end("cancelled", error="cancelled by the admin")
                raise
            except FerryError as exc:
                end("failed", error=str(exc), code=exc.code)
            except Exception as exc:  # a bug: the job must still end, with the reason
                log.exception("job %s (%s) failed unexpectedly", job.id, job.kind)
                end("failed", error=f"internal error: {type(exc).__name__}: {exc}")
            else:
                end("done", result=result)

        job.task = asyncio.create_task(runner(), name=f"{job.kind}-{job.id}")

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
