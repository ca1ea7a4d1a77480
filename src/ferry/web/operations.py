"""What the console reads and does: the same agent calls as the CLI's commands.

Each method names the command it mirrors; the path and the body are the ones
that command sends, through the same :class:`~ferry.client.fleet.Fleet` (VM
lookup by name, the replica host of a replicated VM) and
:class:`~ferry.client.agent_client.AgentClient`. Errors stay
:class:`~ferry.errors.FerryError`, so a refused action reads as the CLI's one line.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ferry.client.fleet import Fleet
from ferry.errors import FerryError

STOP_TIMEOUT_S = 30  # `ferry vm stop`'s default --timeout
POWER_VERBS = ("start", "stop", "kill")
FAILOVER_ON_REPLICA = ("test", "stop-test", "start", "complete", "cancel")


@dataclass(frozen=True)
class HostRow:
    """One configured host as ``ferry host list`` sees it (``error`` when unreachable)."""

    name: str
    url: str
    facts: dict[str, Any] | None
    error: str | None = None

    @property
    def up(self) -> bool:
        return self.facts is not None


@dataclass(frozen=True)
class Listing:
    """What several hosts answered, and which did not answer (one line each)."""

    items: list[dict[str, Any]]
    failures: list[str]


def _not_routed(exc: FerryError) -> bool:
    """The agent has no such route (an older agent): the console skips the feature."""
    return exc.code == "not-found" or exc.message == "HTTP 404"


class Operations:
    """The console's reads and actions over one fleet of agents."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    # -- reads ---------------------------------------------------------------------

    async def hosts(self) -> list[HostRow]:
        """``ferry host list`` (``GET /v1/host`` on every host)."""
        rows = []
        for name, result in (await self.fleet.each("/v1/host")).items():
            url = self.fleet.settings.host(name).url
            if isinstance(result, FerryError):
                rows.append(HostRow(name, url, None, str(result)))
            else:
                rows.append(HostRow(name, url, result))
        return rows

    async def clusters(self) -> list[dict[str, Any]]:
        """``ferry cluster list`` / ``show``; empty while no agent has ``/v1/cluster``."""
        names: dict[str, str] = {}  # cluster -> a host that belongs to it
        for host, result in (await self.fleet.each("/v1/cluster")).items():
            if isinstance(result, dict) and result.get("name"):
                names.setdefault(str(result["name"]), host)
        shown = []
        for cluster, host in sorted(names.items()):
            try:
                shown.append(await self.fleet.client(host).get(f"/v1/clusters/{cluster}"))
            except FerryError as exc:
                if not _not_routed(exc):
                    shown.append({"name": cluster, "error": str(exc), "nodes": []})
        return shown

    async def vms(self, host: str | None = None) -> Listing:
        """``ferry vm list`` (``GET /v1/vms`` on every host)."""
        items: list[dict[str, Any]] = []
        failures: list[str] = []
        for name, result in (await self.fleet.each("/v1/vms", host)).items():
            if isinstance(result, FerryError):
                failures.append(f"{name}: {result}")
            else:
                items += result
        return Listing(sorted(items, key=lambda v: (v["name"], v["host"])), failures)

    async def vm(self, name: str, host: str | None = None) -> tuple[str, dict[str, Any]]:
        """``ferry vm show``: the VM's host and its view."""
        return await self.fleet.locate(name, host)

    async def replication(self, name: str, host: str | None = None) -> dict[str, Any]:
        """``ferry replication measure`` (status with its statistics)."""
        where, _ = await self.fleet.locate(name, host)
        status: dict[str, Any] = await self.fleet.client(where).get(f"/v1/vms/{name}/replication")
        return status

    async def points(self, name: str, host: str | None = None) -> list[dict[str, Any]]:
        """``ferry replication points``."""
        where, _ = await self.fleet.locate(name, host)
        found: list[dict[str, Any]] = await self.fleet.client(where).get(
            f"/v1/vms/{name}/replication/points"
        )
        return found

    async def jobs(self, vm: str | None = None) -> Listing:
        """``ferry job list``, newest first, optionally one VM's (by name or uuid)."""
        items: list[dict[str, Any]] = []
        failures: list[str] = []
        for name, result in (await self.fleet.each("/v1/jobs")).items():
            if isinstance(result, FerryError):
                failures.append(f"{name}: {result}")
            else:
                items += [j for j in result if vm is None or vm in (j["vm"], j.get("vm_uuid"))]
        return Listing(sorted(items, key=lambda j: j["created"], reverse=True), failures)

    async def job(self, host: str, job_id: str) -> dict[str, Any]:
        """``ferry job show ID --host H``."""
        found: dict[str, Any] = await self.fleet.client(host).get(f"/v1/jobs/{job_id}")
        return found

    async def console(self, host: str, name: str, offset: int) -> dict[str, Any]:
        """``ferry vm console`` (one chunk from ``offset``)."""
        chunk: dict[str, Any] = await self.fleet.client(host).get(
            f"/v1/vms/{name}/console", offset=str(offset)
        )
        return chunk

    # -- actions -------------------------------------------------------------------

    async def power(self, verb: str, name: str, host: str | None = None) -> dict[str, Any]:
        """``ferry vm start|stop|kill``; the reply is the VM's view."""
        if verb not in POWER_VERBS:
            raise ValueError(verb)
        where, _ = await self.fleet.locate(name, host)
        body = {"timeout_s": STOP_TIMEOUT_S} if verb == "stop" else None
        reply: dict[str, Any] = await self.fleet.client(where).post(f"/v1/vms/{name}/{verb}", body)
        view: dict[str, Any] = reply.get("vm", reply)  # stop answers {"vm", "forced"}
        return view

    async def move(self, name: str, to: str, host: str | None = None) -> dict[str, Any]:
        """``ferry vm move NAME --to H`` (storage auto); the reply is the job."""
        source, _ = await self.fleet.locate(name, host)
        target = self.fleet.settings.host(to)
        job: dict[str, Any] = await self.fleet.client(source).post(
            f"/v1/vms/{name}/move",
            {"to": to, "to_url": target.url, "storage": "auto", "max_bandwidth": None,
             "downtime_limit_ms": None},
        )  # fmt: skip
        return job

    async def export(self, name: str, to: str, live: bool, host: str | None = None) -> Any:
        """``ferry vm export NAME --to DIR [--live]``; the reply is the job."""
        where, _ = await self.fleet.locate(name, host)
        return await self.fleet.client(where).post(
            f"/v1/vms/{name}/export", {"to": to, "live": live}
        )

    async def enable_replication(
        self, name: str, replica: str, frequency_s: int, host: str | None = None
    ) -> dict[str, Any]:
        """``ferry replication enable VM --replica H --frequency F`` (initial: network)."""
        primary, _ = await self.fleet.locate(name, host)
        target = self.fleet.settings.host(replica)
        status: dict[str, Any] = await self.fleet.client(primary).post(
            f"/v1/vms/{name}/replication",
            {"replica": replica, "replica_url": target.url, "frequency_s": frequency_s,
             "recovery_points": 4, "initial": "network", "media_dir": None,
             "compression": True, "initial_after": None},
        )  # fmt: skip
        return status

    async def replication_action(self, action: str, name: str, host: str | None = None) -> Any:
        """``ferry replication pause|resume|remove``."""
        method, suffix = {"pause": ("POST", "/pause"), "resume": ("POST", "/resume"),
                          "remove": ("DELETE", "")}[action]  # fmt: skip
        where, _ = await self.fleet.locate(name, host)
        return await self.fleet.client(where).call(method, f"/v1/vms/{name}/replication{suffix}")

    async def failover(
        self,
        action: str,
        name: str,
        *,
        point: int | None = None,
        force: bool = False,
        host: str | None = None,
        replica: str | None = None,
    ) -> dict[str, Any]:
        """``ferry failover ACTION VM``: on the replica host, or ``planned`` on the primary.

        ``replica`` is ``--host`` of the replica-side commands (an extended replica),
        ``host`` that of ``planned`` (the primary); ``point`` is ``--point`` of
        ``test`` and ``start``, ``force`` ``--force`` of ``start``. The bodies are the
        CLI's. The reply is the job (every failover operation runs as one).
        """
        body: dict[str, Any] | None
        if action == "planned":
            where, _ = await self.fleet.locate(name, host)
            body = None
        elif action in FAILOVER_ON_REPLICA:
            where = await self.fleet.replica_host(name, replica)
            body = {"test": {"point": point}, "start": {"point": point, "force": force}}.get(
                action, {}
            )
        else:
            raise ValueError(action)
        job: dict[str, Any] = await self.fleet.client(where).post(
            f"/v1/vms/{name}/failover/{action}", body
        )
        return job

    async def gather_replication(
        self, names: list[tuple[str, str]]
    ) -> dict[tuple[str, str], dict[str, Any] | FerryError]:
        """Replication status of several (host, VM) at once, failures returned."""

        async def one(host: str, name: str) -> dict[str, Any] | FerryError:
            try:
                found: dict[str, Any] = await self.fleet.client(host).get(
                    f"/v1/vms/{name}/replication"
                )
                return found
            except FerryError as exc:
                return exc

        results = await asyncio.gather(*(one(h, n) for h, n in names))
        return dict(zip(names, results, strict=True))
