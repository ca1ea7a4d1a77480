"""The hosts a client knows, and finding a VM among them by name."""

from __future__ import annotations

import asyncio
from typing import Any

from ferry.adapters.pki import client_ssl_context
from ferry.client.agent_client import DEFAULT_TIMEOUT_S, AgentClient
from ferry.client.settings import ClientSettings
from ferry.errors import ConflictError, FerryError, NotFoundError


class Fleet:
    """Clients for every configured host, sharing one admin TLS context."""

    def __init__(self, settings: ClientSettings, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """``timeout``: of each request (the CLI waits long; the web console less)."""
        self.settings = settings
        self._tls = client_ssl_context(settings.tls_dir())
        self._timeout = timeout
        self._clients: dict[str, AgentClient] = {}

    async def __aenter__(self) -> Fleet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self._clients.values():
            await client.close()

    def client(self, host: str) -> AgentClient:
        if host not in self._clients:
            entry = self.settings.host(host)
            self._clients[host] = AgentClient(
                host, entry.url, self._tls, server_name=entry.server_name, timeout=self._timeout
            )
        return self._clients[host]

    def host_names(self, only: str | None = None) -> list[str]:
        if only is not None:
            self.settings.host(only)
            return [only]
        return sorted(self.settings.hosts)

    async def each(self, path: str, only: str | None = None) -> dict[str, Any | FerryError]:
        """GET ``path`` on every host at once; failures are returned, not raised."""
        names = self.host_names(only)

        async def one(name: str) -> Any | FerryError:
            try:
                return await self.client(name).get(path)
            except FerryError as exc:
                return exc

        results = await asyncio.gather(*(one(name) for name in names))
        return dict(zip(names, results, strict=True))

    async def locate(self, vm: str, host: str | None = None) -> tuple[str, dict[str, Any]]:
        """The host that has VM ``vm`` and its view; clear errors when 0 or >1."""
        if host is not None:
            return host, await self.client(host).get(f"/v1/vms/{vm}")
        found: list[tuple[str, dict[str, Any]]] = []
        unreachable: list[str] = []
        for name, result in (await self.each("/v1/vms")).items():
            if isinstance(result, FerryError):
                unreachable.append(name)
                continue
            found += [(name, view) for view in result if vm in (view["name"], view["uuid"])]
        if len(found) > 1:
            # A VM that is arriving somewhere still belongs to its source, and a
            # replicated VM is its primary's (the replica host keeps a copy).
            settled = [(name, view) for name, view in found
                       if not view.get("incoming") and view.get("state") != "replica"]  # fmt: skip
            found = settled or found
        if len(found) == 1:
            return found[0]
        if found:
            hosts = ", ".join(name for name, _ in found)
            raise ConflictError(f"VM {vm!r} exists on several hosts ({hosts}): pass --host")
        extra = f" (unreachable: {', '.join(unreachable)})" if unreachable else ""
        raise NotFoundError(f"no VM named {vm!r} on any known host{extra}")

    async def replica_host(self, vm: str, host: str | None = None) -> str:
        """The host that holds VM ``vm`` as a replica (unreachable hosts are skipped).

        An extended replica is only chosen when the first replica cannot be
        reached; ``host`` picks it.
        """
        if host is not None:
            return host
        found: list[tuple[bool, str]] = []
        for where, views in (await self.each("/v1/vms")).items():
            if isinstance(views, FerryError):
                continue
            for view in views:
                summary = view.get("replication") or {}
                if vm in (view["name"], view["uuid"]) and summary.get("role") == "replica":
                    found.append((bool(summary.get("origin")), where))
        if not found:
            raise NotFoundError(f"no reachable host holds a replica of VM {vm!r}; pass --host")
        return sorted(found)[0][1]
