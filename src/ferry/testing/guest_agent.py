"""A fake qemu-ga on a unix socket, for unit tests of the guest agent adapter and freezes.

It speaks the wire format of :mod:`ferry.core.guest_agent` (answers
``guest-sync-delimited`` with ``0xFF`` first) and keeps the freeze state, so
tests can check that a guest is always thawed. Knobs: ``silent`` (accepts the
connection, never answers: qemu-ga not running in the guest), ``refuse``
(command name -> error description), ``stale`` (a reply an earlier client
left in the channel, sent before the sync's answer), ``delay`` (command name
-> seconds before answering). Integration tests use the real qemu-ga.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.core.guest_agent import DELIMITER


@dataclass
class FakeGuestAgent:
    socket_path: Path
    silent: bool = False
    refuse: dict[str, str] = field(default_factory=dict)
    stale: bytes = b""
    delay: dict[str, float] = field(default_factory=dict)
    frozen: bool = False
    commands: list[str] = field(default_factory=list)
    freezes: int = 0
    _server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> FakeGuestAgent:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.socket_path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        self.socket_path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                line = line.lstrip(bytes([DELIMITER])).strip()
                if not line or self.silent:
                    continue
                request = json.loads(line)
                name = str(request.get("execute"))
                self.commands.append(name)
                if name in self.delay:
                    await asyncio.sleep(self.delay[name])
                reply = self._answer(name, request.get("arguments") or {})
                if reply is None:
                    continue
                if name == "guest-sync-delimited":
                    writer.write(self.stale + bytes([DELIMITER]))
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    def _answer(self, name: str, arguments: dict[str, Any]) -> dict[str, Any] | None:
        if name in self.refuse:
            return {"error": {"class": "GenericError", "desc": self.refuse[name]}}
        if name == "guest-sync-delimited":
            return {"return": arguments.get("id")}
        if name == "guest-ping":
            return {"return": {}}
        if name == "guest-fsfreeze-status":
            return {"return": "frozen" if self.frozen else "thawed"}
        if name == "guest-fsfreeze-freeze":
            self.frozen, self.freezes = True, self.freezes + 1
            return {"return": 1}
        if name == "guest-fsfreeze-thaw":
            was, self.frozen = self.frozen, False
            return {"return": 1 if was else 0}
        if name == "guest-shutdown":
            return None  # qemu-ga sends nothing when it obeys
        return {"error": {"class": "CommandNotFound", "desc": f"command {name} not found"}}
