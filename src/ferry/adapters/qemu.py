"""QEMU processes and their QMP channels.

QEMU runs daemonized (its own session, reparented away from the agent), so an
agent can die or be upgraded while VMs run. A process is identified by its
pidfile *and* by the VM's UUID on its command line, so a recycled pid is never
mistaken for a VM. Every QMP or OS error is translated into
:class:`ferry.errors.QemuError` here, and QEMU's run state into a
:class:`QemuStatus` (defined in core, next to the table that reads it).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecuteError, Message, QMPClient, QMPError, Runstate

from ferry.core.vmstate import QemuStatus as QemuStatus  # where QMP strings enter
from ferry.errors import QemuError

log = logging.getLogger(__name__)


def read_pidfile(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def process_matches(pid: int, uuid: str) -> bool:
    """True if ``pid`` is a live QEMU running the VM with ``uuid``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    # A zombie has an empty cmdline, so it never matches.
    return uuid.encode() in cmdline.split(b"\0")


def find_process(pidfile: Path, uuid: str) -> int | None:
    pid = read_pidfile(pidfile)
    return pid if pid is not None and process_matches(pid, uuid) else None


async def wait_gone(pid: int, uuid: str, timeout: float) -> bool:
    """Wait until the process is gone; True if it went within ``timeout``."""
    deadline = time.monotonic() + timeout
    while process_matches(pid, uuid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def kill_process(pid: int, uuid: str, *, timeout: float = 10.0) -> None:
    """SIGKILL the VM's QEMU (only if ``pid`` still is that QEMU) and wait."""
    if not process_matches(pid, uuid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not await wait_gone(pid, uuid, timeout):
        raise QemuError(f"QEMU pid {pid} did not die after SIGKILL within {timeout:.0f}s")


def first_log_line(path: Path) -> str | None:
    """QEMU's first message in its ``-D`` log, without the timestamp ``-msg`` adds."""
    try:
        with path.open(errors="replace") as log_file:
            for line in log_file:
                if line.strip():
                    return _TIMESTAMP.sub("", line.strip())
    except OSError:
        return None
    return None


_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+Z ")


async def launch(
    argv: Sequence[str], *, pidfile: Path, uuid: str, log: Path | None = None,
    timeout: float = 60.0,
) -> int:  # fmt: skip
    """Run a daemonizing QEMU command line; return the daemon's pid.

    QEMU prints start-up errors before it daemonizes and exits non-zero. With
    ``-D`` (``log``) they go to that file, else to stderr; the first line is
    the reason we report. The log of the run before is kept as ``<log>.1``.
    """
    pidfile.unlink(missing_ok=True)
    if log is not None:
        with contextlib.suppress(FileNotFoundError):
            log.replace(log.with_name(log.name + ".1"))
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise QemuError(f"cannot run {argv[0]}: {exc.strerror}") from exc
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise QemuError(f"QEMU did not finish starting within {timeout:.0f}s") from None
    if proc.returncode != 0:
        lines = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
        reason = lines[-1] if lines else None
        if reason is None and log is not None:
            reason = first_log_line(log)
        raise QemuError(f"QEMU refused to start: {reason or f'exit status {proc.returncode}'}")
    pid = read_pidfile(pidfile)
    if pid is None or not process_matches(pid, uuid):
        raise QemuError("QEMU started but left no usable pidfile")
    return pid


class Listener(EventListener):
    """qemu.qmp's listener without its history of every event ever heard.

    ``EventListener.put`` also appends each event to a list that is never
    trimmed (``history``). A VM's channel lives as long as its QEMU, and each
    replication cycle's backup job emits about ten events, so that list grew
    without bound (the soak: ~0.1 MiB a minute per primary agent, all of it
    JOB_STATUS_CHANGE and BLOCK_JOB_COMPLETED messages). Nothing here reads
    the history; events are only consumed from the queue.
    """

    async def put(self, event: Message) -> None:
        if self.accept(event):
            await self._queue.put(event)


def _no_event(_: Message) -> bool:
    return False


class EventWaiter:
    """Events heard by one :meth:`QmpChannel.listen` block."""

    def __init__(self, listener: EventListener) -> None:
        self._listener = listener

    async def next(self, timeout: float) -> dict[str, Any] | None:
        """The next event, or None after ``timeout`` (callers then poll state)."""
        # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the
        # event when a cancellation arrives together with it, and loses that.
        try:
            async with asyncio.timeout(timeout):
                return dict(await self._listener.get())
        except TimeoutError:
            return None


class QmpChannel:
    """One QMP connection to one QEMU, with errors translated."""

    def __init__(self, socket_path: Path, *, name: str) -> None:
        self.socket_path = socket_path
        self.name = name
        self._client = QMPClient(name)
        # The client's default listener (it cannot be removed) would keep every
        # event in its history: it accepts none, and this channel's own hears them.
        self._client.events.event_filter = _no_event
        self._events = Listener()
        self._client.register_listener(self._events)

    async def connect(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self._client.connect(str(self.socket_path))
                return
            except QMPError as exc:
                if time.monotonic() >= deadline:
                    raise QemuError(
                        f"cannot reach QMP of VM {self.name!r} at {self.socket_path}: {exc}"
                    ) from exc
                await asyncio.sleep(0.1)

    @property
    def connected(self) -> bool:
        return self._client.runstate == Runstate.RUNNING

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        try:
            return await self._client.execute(command, arguments)
        except ExecuteError as exc:
            raise QemuError(f"QEMU of VM {self.name!r} refused {command}: {exc}") from exc
        except (QMPError, OSError, EOFError) as exc:
            raise QemuError(f"QMP of VM {self.name!r} failed during {command}: {exc}") from exc

    async def status(self) -> QemuStatus:
        """QEMU's run state; a status this code does not know is UNKNOWN (logged)."""
        reply = await self.execute("query-status")
        status = QemuStatus(str(reply["status"]))
        if status is QemuStatus.UNKNOWN:
            log.warning("QEMU of VM %r reports an unknown status %r", self.name, reply["status"])
        return status

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Yield every QMP event until the connection ends."""
        with contextlib.suppress(QMPError):
            async for event in self._events:
                yield dict(event)

    @contextlib.contextmanager
    def listen(self, *names: str) -> Iterator[EventWaiter]:
        """Hear events named ``names`` from now on (register before acting)."""
        listener = Listener(names=names)
        with self._client.listen(listener):
            yield EventWaiter(listener)

    async def wait_closed(self) -> None:
        """Return once the connection is down (QEMU quit or died)."""
        while self._client.runstate == Runstate.RUNNING:
            await self._client.runstate_changed()

    async def close(self) -> None:
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self._client.disconnect()


def qmp_holders() -> dict[str, dict[str, int]]:
    """Live ``qemu.qmp`` messages by event/reply kind and by what refers to them."""
    kinds: dict[str, int] = {}
    holders: dict[str, int] = {}
    messages = [o for o in gc.get_objects() if isinstance(o, Message)]
    for message in messages:
        kind = str(message.get("event") or ("return" if "return" in message else "other"))
        kinds[kind] = kinds.get(kind, 0) + 1
        for ref in gc.get_referrers(message):
            if ref is messages:
                continue
            name = type(ref).__qualname__
            holders[name] = holders.get(name, 0) + 1
    return {"kinds": kinds, "holders": holders}
