"""The overview page (``/``): hosts, clusters and alerts.

Alerts: a host that does not answer, replication whose health is not
normal (from the lag sampler's latest status), jobs that failed in the last
day.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from ferry.web import context
from ferry.web.operations import HostRow

FAILED_JOBS_WINDOW_S = 24 * 3600


def alerts(hosts: list[HostRow], replication: dict[str, dict[str, Any]],
           jobs: list[dict[str, Any]], *, now: float) -> list[dict[str, str]]:  # fmt: skip
    """What needs the admin, worst first: each ``{"level", "text", "link"}``."""
    found = []
    for row in hosts:
        if not row.up:
            found.append({"level": "error", "text": f"host {row.name} does not answer: {row.error}",
                          "link": "/"})  # fmt: skip
    for vm, status in sorted(replication.items()):
        if status.get("health") not in (None, "normal"):
            reasons = "; ".join(status.get("health_reasons") or []) or status.get("error") or ""
            text = f"replication of VM {vm} is {status['health']}"
            found.append({"level": "warning", "text": f"{text}: {reasons}" if reasons else text,
                          "link": f"/vms/{vm}"})  # fmt: skip
    for job in jobs:
        if job["state"] == "failed" and now - float(job["updated"]) < FAILED_JOBS_WINDOW_S:
            found.append({"level": "warning",
                          "text": f"{job['kind']} of VM {job['vm']} on {job['host']} failed: "
                                  f"{job.get('error') or 'no reason given'}",
                          "link": f"/jobs#job-{job['host']}-{job['id']}"})  # fmt: skip
    return found


def host_rows(hosts: list[HostRow]) -> list[dict[str, Any]]:
    """What the hosts table shows (networks only when the agent reports them)."""
    shown = []
    for row in hosts:
        networks = "-"
        if row.facts is not None and row.facts.get("networks") is not None:
            names = [n if isinstance(n, str) else str(n.get("name")) for n in row.facts["networks"]]
            networks = ", ".join(names) or "none"
        shown.append({"name": row.name, "up": row.up, "error": row.error, "facts": row.facts,
                      "networks": networks})  # fmt: skip
    return shown


def cluster_rows(clusters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``cluster show`` views as the page lists them."""
    shown = []
    for cluster in clusters:
        nodes = [{"name": n.get("name"), "state": n.get("state"),
                  "vms": n["vms"] if isinstance(n.get("vms"), int | str)
                  else ", ".join(map(str, n.get("vms") or [])) or "none"}
                 for n in cluster.get("nodes") or []]  # fmt: skip
        volumes = ", ".join(f"{v.get('name')} ({v.get('path')})"
                            for v in cluster.get("volumes") or []) or "none"  # fmt: skip
        shown.append({"name": cluster.get("name"), "leader": cluster.get("leader"),
                      "functional_level": cluster.get("functional_level"),
                      "error": cluster.get("error"), "nodes": nodes,
                      "volumes": volumes})  # fmt: skip
    return shown


async def show(request: web.Request) -> web.Response:
    ops = context.ops(request)
    hosts, clusters, jobs = await asyncio.gather(ops.hosts(), ops.clusters(), ops.jobs())
    found = alerts(hosts, context.sampler(request).latest(), jobs.items, now=time.time())
    return context.page(request, "overview.html", title="Overview", hosts=host_rows(hosts),
                        clusters=cluster_rows(clusters), alerts=found,
                        failures=jobs.failures)  # fmt: skip


def routes() -> list[web.RouteDef]:
    return [web.get("/", show)]
