"""``ferry job ...``: long operations (moves, exports, failovers, copies) on every known host."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from ferry.cli.output import err, print_json, print_table, say
from ferry.cli.vm_cmd import HostOpt, JsonOpt, with_fleet
from ferry.errors import FerryError, NotFoundError

if TYPE_CHECKING:
    from ferry.client.fleet import Fleet

app = typer.Typer(help="Jobs: list, show, cancel.", no_args_is_help=True)


async def _find(fleet: Fleet, job_id: str, host: str | None) -> tuple[str, dict[str, Any]]:
    for name, result in (await fleet.each(f"/v1/jobs/{job_id}", host)).items():
        if not isinstance(result, FerryError):
            return name, result
    raise NotFoundError(f"no job {job_id!r} on any known host")


@app.command("list")
def list_jobs(host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """List jobs on every known host (or one)."""

    async def run(fleet: Fleet) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = []
        for name, result in (await fleet.each("/v1/jobs", host)).items():
            if isinstance(result, FerryError):
                err.print(f"ferry: warning: {name}: {result}", markup=False)
            else:
                jobs += result
        return sorted(jobs, key=lambda job: job["created"])

    jobs = with_fleet(run)
    if as_json:
        print_json(jobs)
        return
    print_table(["ID", "KIND", "VM", "HOST", "STATE", "TARGET", "ERROR"],
                [[j["id"], j["kind"], j["vm"], j["host"], j["state"], j.get("target"),
                  j.get("error")] for j in jobs])  # fmt: skip


@app.command("show")
def show_job(job_id: str, host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """Show one job."""
    _, job = with_fleet(lambda fleet: _find(fleet, job_id, host))
    if as_json:
        print_json(job)
        return
    for key, value in job.items():
        say(f"{key:>18}: {value}")


@app.command("cancel")
def cancel_job(job_id: str, host: str | None = HostOpt) -> None:
    """Cancel a job; what that means depends on its kind, and the agent says.

    A move cancelled before switch-over leaves the VM where it was; a test,
    unplanned or planned failover stops at its next phase and is undone.
    """

    async def run(fleet: Fleet) -> dict[str, Any]:
        where, _ = await _find(fleet, job_id, host)
        result: dict[str, Any] = await fleet.client(where).post(f"/v1/jobs/{job_id}/cancel")
        return result

    job = with_fleet(run)
    say(f"cancelling job {job['id']} ({job['kind']} of VM {job['vm']})")
