"""A fake fleet for the web console's unit tests: agents that answer from dicts.

:class:`FakeAgent` is an :class:`~ferry.client.agent_client.AgentClient` whose
``call`` answers from a routing table instead of HTTPS, so the real
:class:`~ferry.client.fleet.Fleet` logic (locating a VM, finding its replica
host) runs unchanged, and every call is recorded for the tests to assert on.
"""

from __future__ import annotations

import copy
import re
from collections.abc import AsyncIterable, Callable
from typing import Any

from ferry.client.agent_client import AgentClient
from ferry.client.fleet import Fleet
from ferry.client.settings import ClientSettings, HostEntry
from ferry.errors import FerryError, NotFoundError

Reply = Callable[["FakeAgent", dict[str, Any] | None, dict[str, str]], Any]


def vm_view(name: str, host: str, state: str = "running", **extra: Any) -> dict[str, Any]:
    view = {
        "name": name,
        "uuid": f"uuid-{name}",
        "host": host,
        "state": state,
        "config_version": 1,
        "memory": 256 * 1024**2,
        "cpus": 1,
        "disks": [{"path": f"/data/{name}/disk0.qcow2", "size": 1024**3, "format": "qcow2"}],
        "kernel": None,
        "append": None,
        "pid": 4242,
        "incoming": False,
        "busy": None,
        "replication": None,
    }
    view.update(extra)
    return view


def job(id: str, kind: str, state: str, host: str = "host-1", **extra: Any) -> dict[str, Any]:
    """A job view as ``GET /v1/jobs`` lists it (of VM g1 unless ``vm`` says otherwise)."""
    found = {"id": id, "kind": kind, "vm": "g1", "vm_uuid": "uuid-g1", "host": host,
             "state": state, "phase": state, "created": 1.0, "updated": 2.0, "progress": {},
             "error": None}  # fmt: skip
    found.update(extra)
    return found


def host_facts(name: str, level: int = 1, **extra: Any) -> dict[str, Any]:
    facts = {
        "name": name,
        "url": f"https://127.0.0.1:1000{name[-1]}",
        "version": "0.1.0",
        "functional_level": level,
        "supported_config_versions": [1, level],
        "accelerator": "tcg",
        "qemu_version": "9.2.0",
        "memory": 8 * 1024**3,
        "cpus": 2,
        "vms": 0,
        "running_vms": 0,
        "data_dir": f"/lab/{name}",
        "schema_version": 5,
    }
    facts.update(extra)
    return facts


class FakeAgent(AgentClient):
    """One host's agent: views in dicts; unknown routes answer as aiohttp's 404."""

    def __init__(self, name: str, fleet: FakeFleet) -> None:  # no transport, no TLS
        self.name = name
        self.url = f"https://127.0.0.1:1000{name[-1]}"
        self.thumbprint = None
        self.fleet = fleet
        self.facts = host_facts(name)
        self.vms: dict[str, dict[str, Any]] = {}
        self.jobs: list[dict[str, Any]] = []
        self.replication: dict[str, dict[str, Any]] = {}
        self.points: dict[str, list[dict[str, Any]]] = {}
        self.console_log: dict[str, str] = {}
        self.cluster: dict[str, Any] | FerryError | None = FerryError("HTTP 404")
        self.down: FerryError | None = None
        self.refuse: dict[str, FerryError] = {}  # "METHOD /path" -> error to raise

    async def close(self) -> None:
        return None

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        data: bytes | AsyncIterable[bytes] | None = None,
    ) -> Any:
        self.fleet.calls.append((self.name, method, path, copy.deepcopy(body)))
        if self.down is not None:
            raise self.down
        key = f"{method} {path}"
        if key in self.refuse:
            raise self.refuse[key]
        return copy.deepcopy(self._answer(method, path, body, params or {}))

    def _vm(self, name: str) -> dict[str, Any]:
        if name not in self.vms:
            raise NotFoundError(f"no VM named {name!r} on host {self.name!r}")
        return self.vms[name]

    def _job(self, kind: str, vm: str, **detail: Any) -> dict[str, Any]:
        job = {
            "id": f"{self.name}-job{len(self.jobs) + 1}",
            "kind": kind,
            "vm": vm,
            "vm_uuid": f"uuid-{vm}",
            "host": self.name,
            "state": "running",
            "created": 1000.0 + len(self.jobs),
            "updated": 1000.0,
            "phase": "starting",
            "progress": {},
            "result": None,
            "error": None,
            **detail,
        }
        self.jobs.append(job)
        return job

    def _answer(self, method: str, path: str, body: Any, params: dict[str, str]) -> Any:
        if (method, path) == ("GET", "/v1/host"):
            return self.facts
        if (method, path) == ("GET", "/v1/vms"):
            return list(self.vms.values())
        if (method, path) == ("GET", "/v1/jobs"):
            return self.jobs
        match = re.fullmatch(r"/v1/jobs/([^/]+)", path)
        if match and method == "GET":
            for found in self.jobs:
                if found["id"] == match[1]:
                    return found
            raise NotFoundError(f"no job {match[1]!r} on host {self.name!r}")
        if (method, path) == ("GET", "/v1/cluster"):
            if isinstance(self.cluster, FerryError):
                raise self.cluster
            return self.cluster
        match = re.fullmatch(r"/v1/clusters/([^/]+)", path)
        if match and method == "GET":
            return self.fleet.cluster_views[match[1]]
        match = re.fullmatch(r"/v1/vms/([^/]+)(/.*)?", path)
        if match is None:
            raise FerryError("HTTP 404")
        name, rest = match[1], match[2] or ""
        vm = self._vm(name)
        if (method, rest) == ("GET", ""):
            return vm
        if method == "POST" and rest in ("/start", "/kill"):
            vm["state"] = "running" if rest == "/start" else "off"
            return vm
        if (method, rest) == ("POST", "/stop"):
            vm["state"] = "off"
            return {"vm": vm, "forced": False}
        if (method, rest) == ("GET", "/console"):
            text = self.console_log.get(name, "")
            offset = int(params.get("offset", "0"))
            return {"text": text[offset:], "offset": len(text)}
        if (method, rest) == ("POST", "/move"):
            return self._job("move", name, target=body["to"], phase="preparing")
        if (method, rest) == ("POST", "/export"):
            return self._job("export", name)
        if (method, rest) == ("POST", "/replication"):
            vm["replication"] = {
                "role": "primary",
                "state": "initial",
                "primary": self.name,
                "replica": body["replica"],
                "frequency_s": body["frequency_s"],
                "origin": None,
                "extended": None,
            }
            return {"vm": name, "state": "initial"}
        if rest == "/replication" and method == "GET":
            if name not in self.replication:
                raise NotFoundError(f"VM {name!r} is not replicated")
            return self.replication[name]
        if rest == "/replication/points":
            return self.points.get(name, [])
        if method == "POST" and rest in ("/replication/pause", "/replication/resume"):
            state = "paused" if rest.endswith("pause") else "replicating"
            return {**self.replication.get(name, {}), "state": state}
        if (method, rest) == ("DELETE", "/replication"):
            return {"vm": name, "replica": vm["replication"]["replica"], "removed": True}
        match = re.fullmatch(r"/failover/([a-z-]+)", rest)
        if match and method == "POST":
            return self._job(f"failover-{match[1]}", name)
        raise FerryError("HTTP 404")


class FakeFleet(Fleet):
    """A :class:`Fleet` of :class:`FakeAgent` hosts (``host-1``...)."""

    def __init__(self, *names: str) -> None:  # no admin TLS context
        self.settings = ClientSettings(
            hosts={n: HostEntry(url=f"https://127.0.0.1:1000{n[-1]}", server_name=n) for n in names}
        )
        self.calls: list[tuple[str, str, str, Any]] = []
        self.cluster_views: dict[str, dict[str, Any]] = {}
        self.agents = {name: FakeAgent(name, self) for name in names}
        self._clients: dict[str, AgentClient] = dict(self.agents)

    def actions(self) -> list[tuple[str, str, str, Any]]:
        """The calls that change something (not GETs)."""
        return [c for c in self.calls if c[1] != "GET"]
