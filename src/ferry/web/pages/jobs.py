"""The jobs page (``/jobs``) and the live job rows every page streams (``/jobs/events``).

A stream polls the agents' job lists every ``POLL_S`` and sends the rendered
rows (event ``jobs``) when they changed; htmx's SSE extension swaps them into
the table body. The rate is the job's own (a move's Mbit/s) or, for copies
that report bytes only, measured between two polls of this stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any

from aiohttp import web

from ferry.errors import FerryError
from ferry.web import context, events
from ferry.web.render import size

POLL_S = 1.0
FINAL = ("done", "failed", "cancelled")
SHOWN = 50  # rows on the jobs page; a VM page shows its own


def fraction(job: dict[str, Any]) -> tuple[int, int]:
    """(done, total) bytes of a job's progress, as the CLI's bar counts them (0, 0: unknown)."""
    progress = job.get("progress") or {}
    if progress.get("total"):
        return int(progress.get("bytes") or 0), int(progress["total"])
    total = int(progress.get("disk_total") or 0) + int(progress.get("ram_total") or 0)
    done = int(progress.get("disk_bytes") or 0) + int(progress.get("ram_bytes") or 0)
    return min(done, total), total


def percent(job: dict[str, Any]) -> int | None:
    """How far the bar is; ``None`` while unknown (the bar then shows it is busy)."""
    if job["state"] == "done" or job.get("phase") in ("switching-over", "done"):
        return 100
    done, total = fraction(job)
    if total:
        return round(100 * done / total)
    return 0 if job["state"] in FINAL else None  # an ended job is not busy


def result_text(result: Any) -> str:
    """A job's result in a few words: the figures an admin looks for first."""
    if not isinstance(result, dict):
        return ""
    parts = []
    if result.get("host"):
        parts.append(f"on {result['host']}")
    if result.get("test_vm"):
        parts.append(f"test VM {result['test_vm']}")
    if result.get("point") is not None:
        parts.append(f"recovery point {result['point']}")
    if result.get("total_s") is not None:
        parts.append(f"{float(result['total_s']):.1f} s")
    if result.get("downtime_ms") is not None:
        parts.append(f"{result['downtime_ms']} ms downtime")
    if result.get("folder"):
        parts.append(str(result["folder"]))
    if result.get("bytes") is not None:
        parts.append(size(result["bytes"]))
    return ", ".join(parts)


def row(job: dict[str, Any], rate: float | None = None) -> dict[str, Any]:
    """What a job row shows; ``rate`` in bytes/s when measured by the caller."""
    progress = job.get("progress") or {}
    done, total = fraction(job)
    if job["state"] == "done":
        done = total  # the last progress report may predate the end
    if progress.get("mbps") is not None:
        rate = float(progress["mbps"]) * 1e6 / 8
    return {
        "id": job["id"], "kind": job["kind"], "vm": job["vm"], "host": job["host"],
        "state": job["state"], "phase": job.get("phase") or job["state"],
        "waiting": progress.get("waiting"), "done": done, "total": total,
        "percent": percent(job),
        "rate": rate if job["state"] not in FINAL else None,
        "target": job.get("target"), "error": job.get("error"), "created": job["created"],
        "result": result_text(job.get("result")) if job["state"] == "done" else "",
    }  # fmt: skip


class RateMeter:
    """Bytes per second of each job between two looks."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}

    def rate(self, job: dict[str, Any], now: float) -> float | None:
        done, _ = fraction(job)
        before = self._last.get(job["id"])
        self._last[job["id"]] = (now, done)
        if before is None or now <= before[0] or done < before[1]:
            return None
        return (done - before[1]) / (now - before[0])


def rows(jobs: list[dict[str, Any]], meter: RateMeter | None = None,
         now: float | None = None) -> list[dict[str, Any]]:  # fmt: skip
    when = time.monotonic() if now is None else now
    return [row(j, meter.rate(j, when) if meter else None) for j in jobs]


async def show(request: web.Request) -> web.Response:
    listing = await context.ops(request).jobs()
    return context.page(request, "jobs.html", title="Jobs", jobs=rows(listing.items[:SHOWN]),
                        failures=listing.failures, stream="/jobs/events")  # fmt: skip


async def _job_events(
    request: web.Request, vm: str | None
) -> AsyncGenerator[tuple[str, str] | None, None]:
    ops = context.ops(request)
    meter = RateMeter()
    sent = None
    while True:
        listing = await ops.jobs(vm)
        html = context.fragment(request, "_job_rows.html",
                                jobs=rows(listing.items[:SHOWN], meter))  # fmt: skip
        yield (("jobs", html) if html != sent else None)
        sent = html
        await asyncio.sleep(POLL_S)


async def stream(request: web.Request) -> web.StreamResponse:
    """``GET /jobs/events[?vm=NAME]``: the job rows, re-sent whenever they change."""
    return await events.stream(request, _job_events(request, request.query.get("vm")))


async def _follow_events(request: web.Request, host: str,
                         job_id: str) -> AsyncGenerator[tuple[str, str] | None, None]:  # fmt: skip
    """One job's line (event ``job``) until it ends, then ``end`` (htmx closes the stream)."""
    ops = context.ops(request)
    sent = None
    while True:
        try:
            job = await ops.job(host, job_id)
        except FerryError as exc:
            yield ("job", context.fragment(request, "_job_outcome.html", job=None, error=str(exc)))
            yield ("end", "")
            return
        html = context.fragment(request, "_job_outcome.html", job=row(job), error=None)
        yield (("job", html) if html != sent else None)
        sent = html
        if job["state"] in FINAL:
            yield ("end", "")
            return
        await asyncio.sleep(POLL_S)


async def follow(request: web.Request) -> web.StreamResponse:
    """``GET /jobs/follow?host=H&id=ID``: how the job an action started is doing, in one line."""
    host, job_id = request.query.get("host"), request.query.get("id")
    if not host or not job_id:
        raise web.HTTPBadRequest(text="give host and id")
    return await events.stream(request, _follow_events(request, host, job_id))


def routes() -> list[web.RouteDef]:
    return [web.get("/jobs", show), web.get("/jobs/events", stream),
            web.get("/jobs/follow", follow)]  # fmt: skip
