"""Following a job: a rich progress bar for people, JSON event lines for scripts."""

from __future__ import annotations

import asyncio
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ferry.cli.output import err, print_json
from ferry.client.agent_client import AgentClient
from ferry.core.units import format_size

POLL_S = 0.5
FINAL = ("done", "failed", "cancelled")  # every job kind ends in one of these


def _describe(job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    parts = [job.get("phase", job["state"])]
    if progress.get("waiting"):
        parts.append(progress["waiting"])  # behind another job on the VM's disks
    if progress.get("total"):
        parts.append(f"{format_size(progress['bytes'])}/{format_size(progress['total'])}")
    if progress.get("vms_total"):  # a drain: one VM after another
        parts.append(f"VMs {progress['vms_done']}/{progress['vms_total']}")
        if progress.get("vm"):
            parts.append(f"moving {progress['vm']}")
    if job.get("phase") == "copying-disks" and progress.get("disk_total"):
        parts.append(f"disks {format_size(progress['disk_bytes'])}/"
                     f"{format_size(progress['disk_total'])}")  # fmt: skip
    if progress.get("ram_total"):
        parts.append(f"memory {format_size(progress['ram_bytes'])} sent, "
                     f"{format_size(progress['ram_remaining'])} left")  # fmt: skip
        parts.append(f"{progress.get('mbps', 0):.0f} Mbit/s")
        if progress.get("dirty_pages_rate"):
            parts.append(f"dirty {progress['dirty_pages_rate']} pages/s")
        if progress.get("expected_downtime_ms") is not None:
            parts.append(f"expected downtime {progress['expected_downtime_ms']} ms")
    return ", ".join(parts)


def _fraction(job: dict[str, Any]) -> tuple[float, float]:
    progress = job.get("progress") or {}
    if progress.get("total"):
        return float(progress.get("bytes") or 0), float(progress["total"])
    if progress.get("vms_total"):
        return float(progress.get("vms_done") or 0), float(progress["vms_total"])
    disk_total = progress.get("disk_total") or 0
    ram_total = progress.get("ram_total") or 0
    done = (progress.get("disk_bytes") or 0) + (progress.get("ram_bytes") or 0)
    total = disk_total + ram_total
    if job.get("phase") in ("switching-over", "done"):
        return 1.0, 1.0
    return float(min(done, total)), float(total or 1)


async def follow_job(client: AgentClient, job: dict[str, Any], *, as_json: bool) -> dict[str, Any]:
    """Poll ``job`` until it ends; Ctrl-C cancels it (the VM stays where it was)."""
    path = f"/v1/jobs/{job['id']}"
    try:
        if as_json:
            last = None
            while True:
                event = {key: job.get(key) for key in ("id", "state", "phase", "progress")}
                if event != last:
                    print_json({"event": "progress", **event})
                    last = event
                if job["state"] in FINAL:
                    return job
                await asyncio.sleep(POLL_S)
                job = await client.get(path)
        with Progress(
            TextColumn("[bold]{task.fields[vm]}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=err,
            transient=True,
        ) as bar:
            task = bar.add_task(_describe(job), vm=f"{job['kind']} {job['vm']}", total=1.0)
            while True:
                done, total = _fraction(job)
                bar.update(task, completed=done, total=total, description=_describe(job))
                if job["state"] in FINAL:
                    return job
                await asyncio.sleep(POLL_S)
                job = await client.get(path)
    except (KeyboardInterrupt, asyncio.CancelledError):
        await client.post(f"/v1/jobs/{job['id']}/cancel")
        raise
