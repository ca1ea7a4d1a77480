"""The VMs page (``/vms``): every VM on every host, with its replication health."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ferry.web import context


def rows(vms: list[dict[str, Any]], replication: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """What the table shows of each VM (replica copies link with their host)."""
    shown = []
    for vm in vms:
        summary = vm.get("replication") or {}
        role = summary.get("role")
        health = None
        if role == "replica":
            text = f"replica of {summary.get('primary')}"
        elif role == "primary":
            status = replication.get(vm["name"]) or {}
            health = status.get("health")
            text = f"to {summary.get('replica')}: " + str(health or summary.get("state"))
        else:
            text = "not replicated"
        link = f"/vms/{vm['name']}" + (f"?host={vm['host']}" if role == "replica" else "")
        shown.append({
            "name": vm["name"], "host": vm["host"], "state": vm["state"],
            "config_version": vm["config_version"], "memory": vm["memory"], "cpus": vm["cpus"],
            "nics": ", ".join(n.get("network", "?") for n in vm.get("nics") or []) or "none",
            "replication": text, "health": health, "link": link, "busy": vm.get("busy"),
        })  # fmt: skip
    return shown


async def show(request: web.Request) -> web.Response:
    listing = await context.ops(request).vms()
    return context.page(request, "vms.html", title="VMs",
                        vms=rows(listing.items, context.sampler(request).latest()),
                        failures=listing.failures)  # fmt: skip


def routes() -> list[web.RouteDef]:
    return [web.get("/vms", show)]
