"""The agent's side of the fence guard (:mod:`ferry.host.cluster.guard`).

:class:`FenceGuardClient` finds the host's running guard by its socket or
starts one (daemonized, so it outlives this agent), then sends it the
lines of the guard's wire format. It remembers what it asked the guard to
protect, so a guard that had to be started again (it was killed) is told
again at once. Every failure to start or reach the guard is a
:class:`~ferry.errors.FenceGuardError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from typing import Any

from ferry.adapters.qemu import process_matches
from ferry.errors import FenceGuardError
from ferry.host.cluster.guard import GuardPaths

log = logging.getLogger(__name__)

START_TIMEOUT_S = 15.0
REQUEST_TIMEOUT_S = 2.0


class FenceGuardClient:
    """One agent's connection to its host's guard."""

    def __init__(self, paths: GuardPaths, *, limit_s: float, python: str = sys.executable) -> None:
        self.paths = paths
        self.limit_s = limit_s
        self.python = python
        self.protected: dict[str, int] = {}  # what this client asked the guard to protect
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.pid: int | None = None  # the guard's

    # -- connecting --------------------------------------------------------------

    async def ensure_running(self) -> int:
        """Connect to the host's guard, starting it if none runs; the guard's pid."""
        async with self._lock:
            await self._ensure()
            assert self.pid is not None
            return self.pid

    async def _ensure(self) -> None:
        if self._writer is not None and not self._writer.is_closing():
            return
        if not await self._connect():
            await self._launch()
            if not await self._connect():
                raise FenceGuardError(f"the fence guard started but {self.paths.socket} "
                                      "does not answer")  # fmt: skip
        status = await self._exchange("status")
        self.pid = int(status["pid"])
        if status["limit_s"] != self.limit_s:
            await self._exchange(f"limit {self.limit_s}")
        # A guard started anew knows nothing: tell it what we protect.
        for uuid, pid in list(self.protected.items()):
            if status["protected"].get(uuid) == pid:
                continue
            if process_matches(pid, uuid):
                await self._exchange(f"protect {uuid} {pid}")
            else:
                del self.protected[uuid]

    async def _connect(self) -> bool:
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(str(self.paths.socket))
        except OSError:
            self._reader = self._writer = None
            return False
        return True

    async def _launch(self) -> None:
        argv = [self.python, "-m", "ferry.host.cluster.guard", "--daemonize",
                "--socket", str(self.paths.socket), "--limit", str(self.limit_s),
                "--log", str(self.paths.log), "--pidfile", str(self.paths.pidfile)]  # fmt: skip
        self.paths.socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # the guard outlives this agent
            )
        except OSError as exc:
            raise FenceGuardError(f"cannot run the fence guard: {exc.strerror}") from exc
        try:
            _, stderr = await asyncio.wait_for(proc.communicate(), START_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise FenceGuardError(
                f"the fence guard did not start within {START_TIMEOUT_S:.0f}s"
            ) from None
        if proc.returncode != 0:
            lines = stderr.decode(errors="replace").strip().splitlines()
            raise FenceGuardError(lines[-1] if lines else "the fence guard failed to start")
        log.info("started the fence guard on %s (limit %.2fs)", self.paths.socket, self.limit_s)

    # -- requests ----------------------------------------------------------------

    async def _exchange(self, line: str) -> Any:
        """Send one line, read the answer; ``ok JSON`` gives the JSON, ``ok`` None."""
        assert self._reader is not None and self._writer is not None
        try:
            self._writer.write(line.encode() + b"\n")
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                await self._writer.drain()
                answer = (await self._reader.readline()).decode().strip()
        except (OSError, TimeoutError) as exc:
            await self._drop()
            raise FenceGuardError(f"the fence guard on {self.paths.socket} failed: {exc}") from exc
        if not answer:
            await self._drop()
            raise FenceGuardError(f"the fence guard on {self.paths.socket} closed the connection")
        word, _, rest = answer.partition(" ")
        if word != "ok":
            raise FenceGuardError(f"the fence guard refused {line.split()[0]!r}: {rest}")
        return json.loads(rest) if rest else None

    async def _request(self, line: str) -> Any:
        """One request; a guard that vanished is found or started again, once."""
        async with self._lock:
            try:
                await self._ensure()
                return await self._exchange(line)
            except FenceGuardError:
                if self._writer is not None:
                    raise  # it answered and refused
            await self._ensure()
            return await self._exchange(line)

    async def _drop(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def beat(self) -> None:
        await self._request("beat")

    async def protect(self, uuid: str, pid: int) -> None:
        """Have the guard kill ``pid`` (VM ``uuid``'s QEMU) if the beats stop."""
        self.protected[uuid] = pid
        try:
            await self._request(f"protect {uuid} {pid}")
        except FenceGuardError:
            if not process_matches(pid, uuid):
                self.protected.pop(uuid, None)
            raise

    async def release(self, uuid: str) -> None:
        self.protected.pop(uuid, None)
        await self._request(f"release {uuid}")

    async def sync(self, wanted: dict[str, int]) -> None:
        """Make the guard protect exactly ``wanted`` (uuid -> QEMU pid)."""
        status = await self.status()
        held: dict[str, int] = {k: int(v) for k, v in status["protected"].items()}
        for uuid in held.keys() - wanted.keys():
            await self.release(uuid)
        for uuid, pid in wanted.items():
            if held.get(uuid) != pid:
                await self.protect(uuid, pid)
            self.protected[uuid] = pid

    async def status(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("status")
        return result

    async def disarm(self) -> None:
        """Release everything (an older agent's protections too); the guard then exits."""
        await self.sync({})
        await self._request("disarm")
        await self.close()

    async def close(self) -> None:
        """Let go of the connection; the guard keeps running."""
        async with self._lock:
            await self._drop()
