"""Small QEMU models for migration tests, built on :class:`~ferry.testing.qmp.FakeQmp`.

:class:`SourceQemu` answers like a running QEMU that is asked to migrate:
mirrors become ready, ``migrate`` runs to ``pre-switchover`` (or holds in
``active`` while :attr:`SourceQemu.hold` is set), ``migrate-continue``
completes, ``migrate_cancel`` cancels, ``cont`` resumes; each change is
announced with the event QEMU sends. :class:`IncomingQemu` is the paused
``-incoming`` QEMU on the destination: it has loaded the stream once its
source completed. A test breaks a step with ``qmp.fail(...)`` or by setting
the model's fields; the fake's ``calls`` show what was asked, in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ferry.testing.qmp import FakeQmp

DISK_BYTES = 1 << 20  # what each modelled mirror copies


@dataclass
class SourceQemu:
    """A running source QEMU's migration, as QMP shows it."""

    qmp: FakeQmp = field(default_factory=lambda: FakeQmp("source"))
    run: str = "running"
    migration: str = "none"
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    hold: bool = False  # keep the memory stream 'active' (a slow copy)
    fail_migration: str | None = None  # the stream fails with this error-desc
    downtime_ms: int = 42
    # QEMU 7.2 says "completed" before it filled in the times: this many
    # completed replies come with downtime and total-time 0.
    times_late: int = 0

    def __post_init__(self) -> None:
        q = self.qmp
        q.on("query-status", lambda _: {"status": self.run, "running": self.run == "running"})
        q.on("query-migrate", self._query_migrate)
        q.on("query-block-jobs", self._query_block_jobs)
        q.on("blockdev-mirror", self._mirror)
        q.on("block-job-cancel", self._cancel_job)
        q.on("migrate", self._migrate)
        q.on("migrate-continue", self._continue)
        q.on("migrate_cancel", self._migrate_cancel)
        q.on("cont", self._cont)

    def _set(self, status: str) -> None:
        self.migration = status
        self.qmp.emit("MIGRATION", {"status": status})

    def _query_migrate(self, _: Any) -> dict[str, Any]:
        if self.migration == "active" and self.fail_migration:
            self.run = "running"
            self._set("failed")
            return {"status": "failed", "error-desc": self.fail_migration}
        reply: dict[str, Any] = {"status": self.migration}
        if self.migration != "none":
            reply["ram"] = {"transferred": 4096, "remaining": 0, "total": 8192, "mbps": 1.0,
                            "dirty-pages-rate": 0}  # fmt: skip
        if self.migration == "completed":
            late = self.times_late > 0
            self.times_late -= 1 if late else 0
            reply["downtime"] = 0 if late else self.downtime_ms
            reply["total-time"] = 0 if late else 1000 + self.downtime_ms
        if self.migration == "active" and not self.hold:
            self.run = "finish-migrate"
            self.qmp.emit("STOP")  # the vCPUs stop before QEMU waits in pre-switchover
            self._set("pre-switchover")  # seen by the next query, announced now
        return reply

    def _query_block_jobs(self, _: Any) -> list[dict[str, Any]]:
        reply = [dict(job) for job in self.jobs.values()]
        for job in self.jobs.values():
            if not job["ready"]:
                job.update(ready=True, offset=job["len"])
                self.qmp.emit("BLOCK_JOB_READY", {"device": job["device"]})
        return reply

    def _mirror(self, args: Any) -> dict[str, Any]:
        self.jobs[args["job-id"]] = {"device": args["job-id"], "offset": 0,
                                     "len": DISK_BYTES, "ready": False}  # fmt: skip
        return {}

    def _cancel_job(self, args: Any) -> dict[str, Any]:
        self.jobs.pop(args["device"], None)
        self.qmp.emit("BLOCK_JOB_COMPLETED", {"device": args["device"]})
        return {}

    def _migrate(self, _: Any) -> dict[str, Any]:
        self._set("active")
        return {}

    def _continue(self, _: Any) -> dict[str, Any]:
        self.run = "postmigrate"
        self._set("completed")
        return {}

    def _migrate_cancel(self, _: Any) -> dict[str, Any]:
        if self.migration in ("active", "pre-switchover"):
            self._set("cancelled")
        return {}

    def _cont(self, _: Any) -> dict[str, Any]:
        self.run = "running"
        self.qmp.emit("RESUME")
        return {}


@dataclass
class IncomingQemu:
    """The destination's paused ``-incoming`` QEMU, fed by ``source``."""

    source: SourceQemu
    qmp: FakeQmp = field(default_factory=lambda: FakeQmp("destination"))
    run: str = "inmigrate"
    loads: str = "completed"  # what the incoming side ends in once the source completed
    autostart: bool = False  # 'cont' came while loading: run once loaded

    def __post_init__(self) -> None:
        q = self.qmp
        q.on("query-status", lambda _: {"status": self.run, "running": self.run == "running"})
        q.on("query-migrate", self._query_migrate)
        q.on("cont", self._cont)

    def _query_migrate(self, _: Any) -> dict[str, Any]:
        if self.source.migration == "completed":
            if self.autostart and self.loads == "completed" and self.run != "running":
                self.run = "running"  # QEMU starts the vCPUs as the load's last step
                self.qmp.emit("RESUME")
            return {"status": self.loads}
        started = any(command == "migrate-incoming" for command in self.qmp.commands())
        return {"status": "active" if started else "none"}

    def _cont(self, _: Any) -> dict[str, Any]:
        if self.run == "inmigrate" and self.source.migration != "completed":
            self.autostart = True  # QEMU's cont while loading: it runs the guest when done
            return {}
        self.run = "running"
        self.qmp.emit("RESUME")
        return {}
