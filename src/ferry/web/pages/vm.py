"""The VM page (``/vms/NAME``): state, actions, serial console, disks, replication, jobs.

Parts of the page refresh themselves: the summary every few seconds, the
replication figures likewise, the console and the VM's jobs through
server-sent events; after an action succeeds the answer carries
``HX-Trigger: ferry-changed`` so every part reloads at once. Each action
is one :class:`~ferry.web.operations.Operations` call, the CLI's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from aiohttp import web
from multidict import MultiDictProxy

from ferry.core.replication import Frequency, format_frequency
from ferry.errors import FerryError, InvalidInputError, NotFoundError
from ferry.web import context, events
from ferry.web.operations import HostRow, Operations
from ferry.web.pages.jobs import rows as job_rows
from ferry.web.render import frequency
from ferry.web.targets import move_targets

CONSOLE_POLL_S = 0.3
CHANGED = {"HX-Trigger": "ferry-changed"}
FREQUENCIES = [(int(f), format_frequency(int(f))) for f in Frequency]


def _host(request: web.Request) -> str | None:
    return request.query.get("host") or None


async def _replication(ops: Operations, name: str, host: str,
                       view: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Status and points of a replicated VM, as its host reports them (errors as lines)."""
    if not view.get("replication"):
        return {"status": None, "points": [], "error": None}
    try:
        status, points = await asyncio.gather(ops.replication(name, host),
                                              ops.points(name, host))  # fmt: skip
    except FerryError as exc:
        return {"status": None, "points": [], "error": str(exc)}
    return {"status": status, "points": list(reversed(points)), "error": None}


def replication_text(view: dict[str, Any]) -> str:
    """The VM's part in replication, as the summary says it."""
    summary = view.get("replication") or {}
    if not summary:
        return "not replicated"
    if summary.get("role") == "replica":
        return f"replica of {summary.get('primary')} ({summary.get('state')})"
    every = frequency(summary.get("frequency_s"))
    return f"to {summary.get('replica')} every {every} ({summary.get('state')})"


def _warnings(view: dict[str, Any], points: list[dict[str, Any]]) -> list[str]:
    """What an unplanned failover does, said before the admin confirms it."""
    summary = view.get("replication") or {}
    primary, replica = summary.get("primary", "the primary"), summary.get("replica", "the replica")
    latest = f"recovery point {points[0]['id']}" if points else "the latest recovery point"
    return [
        f"Use this when {primary} is lost: the VM starts on {replica} from {latest}.",
        f"Ferry asks {primary} first and refuses while it answers and runs the VM; "
        "'force' starts it anyway, and then two copies run (split brain).",
        f"Changes made on {primary} after {latest} are lost.",
        "The replica takes no new points while failed over; 'complete' makes it final, "
        "'cancel' goes back.",
    ]


async def show(request: web.Request) -> web.Response:
    ops = context.ops(request)
    name, pinned = request.match_info["name"], _host(request)
    try:
        host, view = await ops.vm(name, pinned)
    except FerryError as exc:
        status = 404 if isinstance(exc, NotFoundError) else 502
        return context.page(request, "outcome.html", http_status=status, title=f"VM {name}",
                            ok=None, error=str(exc), back="/vms", job=None)  # fmt: skip
    hosts, listing, jobs = await asyncio.gather(ops.hosts(), ops.vms(), ops.jobs(view["uuid"]))
    replica_hosts = {v["host"] for v in listing.items
                     if v["uuid"] == view["uuid"] and v["state"] == "replica"}  # fmt: skip
    replication = await _replication(ops, name, host, view)
    targets = move_targets(view, hosts, replica_hosts=replica_hosts)
    query = f"?host={pinned}" if pinned else ""
    return context.page(
        request, "vm.html", title=f"VM {name}", vm=view, host=host, query=query,
        targets=targets, can_move=any(t.ok for t in targets), jobs=job_rows(jobs.items),
        replication_text=replication_text(view),
        samples=len(_samples(request, name)),
        **_actions_data(view, host, pinned, hosts, listing.items, replication["points"]),
        **replication,
    )  # fmt: skip


def _actions_data(
    view: dict[str, Any],
    host: str,
    pinned: str | None,
    hosts: list[HostRow],
    vms: list[dict[str, Any]],
    points: list[dict[str, Any]],
) -> dict[str, Any]:
    """What the replication actions show: replica choices, the test VM, the warnings,
    and the hosts that hold a replica of the VM (``ferry failover ... --host``)."""
    test_name = f"{view['name']}-test"
    return {
        "pinned": pinned, "replica_choices": [h.name for h in hosts if h.name != host],
        "frequencies": FREQUENCIES, "warnings": _warnings(view, points),
        "test_vm": next((v for v in vms if v["name"] == test_name), None),
        "replica_hosts": replica_hosts(view, host, vms),
    }  # fmt: skip


def replica_hosts(
    view: dict[str, Any], host: str, vms: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The hosts holding the VM as a replica, first replicas first; the page's own host is
    chosen when the page shows a replica copy (as ``--host`` would name it)."""
    mine = view.get("replication") or {}
    found = sorted((bool((v.get("replication") or {}).get("origin")), v["host"]) for v in vms
                   if v["uuid"] == view["uuid"]
                   and (v.get("replication") or {}).get("role") == "replica")  # fmt: skip
    return [{"host": where, "extended": extended,
             "selected": where == host and mine.get("role") == "replica"}
            for extended, where in found]  # fmt: skip


def _fragment_error(request: web.Request, exc: FerryError) -> web.Response:
    """A part of the page that cannot be read now says why, in one line (polled parts
    would repeat an alert every few seconds, so it is a plain line)."""
    html = context.fragment(request, "_fragment_error.html", error=str(exc))
    return web.Response(text=html, content_type="text/html")


async def summary(request: web.Request) -> web.Response:
    """The summary fragment (state, host, version, busy), polled by the page."""
    name = request.match_info["name"]
    try:
        host, view = await context.ops(request).vm(name, _host(request))
    except FerryError as exc:
        return _fragment_error(request, exc)
    html = context.fragment(request, "_vm_summary.html", vm=view, host=host,
                            replication_text=replication_text(view))  # fmt: skip
    return web.Response(text=html, content_type="text/html")


async def replication(request: web.Request) -> web.Response:
    """The replication figures fragment (status, cycles, points), polled by the page."""
    ops = context.ops(request)
    name = request.match_info["name"]
    try:
        host, view = await ops.vm(name, _host(request))
    except FerryError as exc:
        return _fragment_error(request, exc)
    data = await _replication(ops, name, host, view)
    html = context.fragment(request, "_replication.html", vm=view, **data)
    return web.Response(text=html, content_type="text/html")


async def replication_actions(request: web.Request) -> web.Response:
    """The replication actions fragment, reloaded after an action (enable <-> manage)."""
    ops = context.ops(request)
    name, pinned = request.match_info["name"], _host(request)
    try:
        host, view = await ops.vm(name, pinned)
        hosts, listing = await asyncio.gather(ops.hosts(), ops.vms())
    except FerryError as exc:
        return _fragment_error(request, exc)
    data = await _replication(ops, name, host, view)
    html = context.fragment(request, "_replication_actions.html", vm=view, points=data["points"],
                            **_actions_data(view, host, pinned, hosts, listing.items,
                                            data["points"]))  # fmt: skip
    return web.Response(text=html, content_type="text/html")


def _samples(request: web.Request, name: str) -> list[tuple[float, float]]:
    return [(s.time, s.lag_s) for s in context.sampler(request).series(name) if s.lag_s is not None]


async def lag(request: web.Request) -> web.Response:
    """``{"t": [unix s...], "lag": [s...]}``: the lag samples of the VM, for uPlot."""
    samples = _samples(request, request.match_info["name"])
    return web.json_response({"t": [t for t, _ in samples], "lag": [v for _, v in samples],
                              "interval_s": context.sampler(request).interval_s})  # fmt: skip


async def _console_events(request: web.Request) -> AsyncGenerator[tuple[str, str] | None, None]:
    """The serial log as ``console`` events of JSON text; follows the VM when it moves."""
    ops = context.ops(request)
    name, pinned = request.match_info["name"], _host(request)
    host: str | None = None
    offset = 0
    while True:
        try:
            if host is None:
                host, _ = await ops.vm(name, pinned)
            chunk = await ops.console(host, name, offset)
        except NotFoundError:
            if host is not None and pinned is None:  # moved away: find it again
                note = f"\r\n[ferry: VM {name} left {host}; following it]\r\n"
                host, offset = None, 0
                yield ("console", json.dumps(note))
            await asyncio.sleep(1.0)
            continue
        except FerryError as exc:
            yield ("console-error", str(exc))
            await asyncio.sleep(2.0)
            continue
        if int(chunk["offset"]) < offset:  # a new run started its log afresh
            yield ("console", json.dumps("\r\n[ferry: new run]\r\n"))
        offset = int(chunk["offset"])
        yield (("console", json.dumps(chunk["text"])) if chunk["text"] else None)
        await asyncio.sleep(CONSOLE_POLL_S)


async def console(request: web.Request) -> web.StreamResponse:
    return await events.stream(request, _console_events(request))


# -- actions -------------------------------------------------------------------------

Form = MultiDictProxy[str | Any]
Done = tuple[str, dict[str, Any] | None]  # the line to show, the job the action started
Action = Callable[[Operations, str, str | None, Form], Awaitable[Done]]


def _field(form: Form, key: str) -> str:
    value = str(form.get(key) or "").strip()
    if not value:
        raise InvalidInputError(f"give {key.replace('_', ' ')}")
    return value


async def _power(verb: str, ops: Operations, name: str, host: str | None, form: Form) -> Done:
    view = await ops.power(verb, name, host)
    return f"VM {name} is {view['state']} on {view['host']}", None


async def _move(ops: Operations, name: str, host: str | None, form: Form) -> Done:
    to = _field(form, "to")
    job = await ops.move(name, to, host)
    return f"moving VM {name} to {to} (job {job['id']})", job


async def _export(ops: Operations, name: str, host: str | None, form: Form) -> Done:
    folder = _field(form, "to")
    job = await ops.export(name, folder, form.get("live") == "on", host)
    return f"exporting VM {name} to {folder} (job {job['id']})", job


async def _enable(ops: Operations, name: str, host: str | None, form: Form) -> Done:
    replica = _field(form, "replica")
    try:
        seconds = int(form.get("frequency_s") or 300)
    except ValueError:
        raise InvalidInputError("the frequency must be one of the choices") from None
    await ops.enable_replication(name, replica, seconds, host)
    return (
        f"replication of VM {name} to {replica} enabled; the initial copy runs (see its job)",
        None,
    )


async def _replication_action(action: str, ops: Operations, name: str, host: str | None,
                              form: Form) -> Done:  # fmt: skip
    found = await ops.replication_action(action, name, host)
    if action == "remove":
        return f"replication of VM {name} to {found['replica']} removed", None
    return f"replication of VM {name} is {found['state']}", None


def _point(form: Form) -> int | None:
    text = str(form.get("point") or "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise InvalidInputError(f"the recovery point must be a point id, not {text!r}") from None


async def _failover(action: str, ops: Operations, name: str, host: str | None,
                    form: Form) -> Done:  # fmt: skip
    """``ferry failover ACTION VM [--point P] [--force] [--host H]``: ``--host`` is the
    chosen replica host, or for ``planned`` the page's host (the primary)."""
    replica = str(form.get("replica_host") or "").strip() or None
    job = await ops.failover(action, name, point=_point(form), force=form.get("force") == "on",
                             host=host, replica=replica)  # fmt: skip
    return f"failover {action} of VM {name} started on {job['host']} (job {job['id']})", job


def _bind(function: Callable[..., Awaitable[Done]], first: str) -> Action:
    async def bound(ops: Operations, name: str, host: str | None, form: Form) -> Done:
        return await function(first, ops, name, host, form)

    return bound


ACTIONS: dict[str, Action] = {
    "start": _bind(_power, "start"), "stop": _bind(_power, "stop"),
    "kill": _bind(_power, "kill"), "move": _move, "export": _export,
    "repl-enable": _enable, "repl-pause": _bind(_replication_action, "pause"),
    "repl-resume": _bind(_replication_action, "resume"),
    "repl-remove": _bind(_replication_action, "remove"),
    **{f"failover-{a}": _bind(_failover, a)
       for a in ("test", "stop-test", "planned", "start", "complete", "cancel")},
}  # fmt: skip


async def act(request: web.Request) -> web.Response:
    """``POST /vms/NAME/actions/ACTION``: one action, answered with one line."""
    name, action = request.match_info["name"], request.match_info["action"]
    if action not in ACTIONS:
        raise web.HTTPNotFound(text=f"no action {action!r}")
    form = await request.post()
    host = str(form.get("host") or "") or None
    back = f"/vms/{name}" + (f"?host={host}" if host else "")
    try:
        message, job = await ACTIONS[action](context.ops(request), name, host, form)
    except FerryError as exc:
        return context.outcome(request, error=exc, back=back)
    reply = context.outcome(request, ok=message, back=back, job=job)
    reply.headers.update(CHANGED)
    return reply


def routes() -> list[web.RouteDef]:
    return [
        web.get("/vms/{name}", show),
        web.get("/vms/{name}/summary", summary),
        web.get("/vms/{name}/replication", replication),
        web.get("/vms/{name}/replication-actions", replication_actions),
        web.get("/vms/{name}/lag.json", lag),
        web.get("/vms/{name}/console/events", console),
        web.post("/vms/{name}/actions/{action}", act),
    ]
