"""The fence guard: a small process per node that kills the node's clustered QEMUs
when its agent stops proving that the node's lease is alive.

The agent's :class:`~ferry.host.cluster.fencing.LeaseKeeper` beats the guard
after each successful lease renewal. If the beats stop for longer than the
guard's limit (the agent died, hung, or lost etcd), the guard SIGKILLs every
QEMU it protects, after checking that ``/proc/PID/cmdline`` still carries the
VM's UUID (a pid the kernel gave to another process is never killed), logs
what it killed and when, and forgets them. The limit comes from
:class:`~ferry.core.cluster.timing.ClusterTimings`: it ends before the lease
could expire, so the QEMUs are dead before another node may start them.

The guard daemonizes (its own session), so it outlives the agent that started
it; a new agent finds it by its socket, whose name is derived from the host
(``<run dir>/guard-<host>.sock``), and takes over instead of starting another.
Its pidfile and JSON-lines log are ``fence-guard.pid`` and ``fence-guard.log``
in the host's data dir, so ``remove what matches`` finds it after any crash.

Wire format: a unix stream socket; the client sends one line, the guard
answers one line (UTF-8, ``\\n``-terminated)::

    beat                  -> ok                 the lease was renewed just now
    protect UUID PID      -> ok | err REASON    kill PID if beats stop (PID must run UUID)
    release UUID          -> ok                 no longer ours to kill
    limit SECONDS         -> ok | err REASON    a new limit (an agent with another TTL)
    status                -> ok {"pid", "limit_s", "since_beat_s", "protected", "kills"}
    disarm                -> ok                 exit once nothing is protected
    anything else         -> err unknown command ...

Log lines are JSON objects with ``at`` (epoch seconds) and ``event``:
``started``, ``protect``, ``release``, ``fence`` (beats stopped), ``killed``
(the SIGKILL was sent), ``gone`` (the process has ended), ``skipped`` (its
cmdline lacks the UUID), ``disarmed``, ``stopped``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.adapters.qemu import process_matches
from ferry.core.cluster.timing import GUARD_TICK_S
from ferry.errors import FenceGuardError

log = logging.getLogger(__name__)

GONE_WAIT_S = 5.0  # how long the guard waits to see a killed QEMU end, for its log


@dataclass(frozen=True)
class GuardPaths:
    """Where one host's guard listens, writes its pid and logs."""

    socket: Path
    pidfile: Path
    log: Path

    @classmethod
    def of_host(cls, name: str, data_dir: Path, run_dir: Path) -> GuardPaths:
        return cls(socket=run_dir / f"guard-{name}.sock",
                   pidfile=data_dir / "fence-guard.pid",
                   log=data_dir / "fence-guard.log")  # fmt: skip

    def pid(self) -> int | None:
        """The pid of the running guard of these paths, if one runs."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _runs(pid, self.socket) else None


def read_log(path: Path) -> list[dict[str, Any]]:
    """The guard's log records, oldest first (a torn last line is left out)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


def _runs(pid: int, socket_path: Path) -> bool:
    """Whether ``pid`` still is the guard of ``socket_path`` (a zombie is not)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(socket_path).encode() in cmdline


def stop_guard(paths: GuardPaths, timeout: float = 5.0) -> bool:
    """End the guard of ``paths`` by its pid (SIGTERM, then SIGKILL); True if one ran.

    A stopped guard kills nothing; its QEMUs are left as they are. Returns once
    the process has ended (its pidfile goes a moment before it does).
    """
    pid = paths.pid()
    if pid is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _runs(pid, paths.socket) and time.monotonic() < deadline:
        time.sleep(0.02)
    if _runs(pid, paths.socket):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while _runs(pid, paths.socket):
            time.sleep(0.02)
    return True


# -- the guard process ---------------------------------------------------------


class FenceGuard:
    """The guard's state: what it protects, when it was last beaten, and its log."""

    def __init__(self, limit_s: float, log_path: Path) -> None:
        self.limit_s = limit_s
        self.log_path = log_path
        self.protected: dict[str, int] = {}
        self.last_beat = time.monotonic()
        self.kills = 0
        self.disarmed = False

    def record(self, event: str, **fields: Any) -> None:
        line = json.dumps({"at": round(time.time(), 4), "event": event, **fields})
        with self.log_path.open("a") as out:
            out.write(line + "\n")

    def handle(self, line: str) -> str:
        """One request line -> one reply line (without the newline)."""
        words = line.split()
        match words:
            case ["beat"]:
                self.last_beat = time.monotonic()
                return "ok"
            case ["protect", uuid, pid] if pid.isdigit():
                if not process_matches(int(pid), uuid):
                    return f"err pid {pid} does not run VM {uuid}"
                self.protected[uuid] = int(pid)
                self.record("protect", vm=uuid, pid=int(pid))
                return "ok"
            case ["release", uuid]:
                if self.protected.pop(uuid, None) is not None:
                    self.record("release", vm=uuid)
                return "ok"
            case ["limit", seconds]:
                try:
                    limit = float(seconds)
                except ValueError:
                    return f"err not a number of seconds: {seconds!r}"
                if not limit > 0:
                    return "err the limit must be positive"
                self.limit_s = limit
                return "ok"
            case ["status"]:
                status = {"pid": os.getpid(), "limit_s": self.limit_s,
                          "since_beat_s": round(time.monotonic() - self.last_beat, 3),
                          "protected": self.protected, "kills": self.kills}  # fmt: skip
                return "ok " + json.dumps(status)
            case ["disarm"]:
                self.disarmed = True
                self.record("disarmed", protected=len(self.protected))
                return "ok"
        return f"err unknown command {line.strip()[:80]!r}"

    def overdue(self) -> float | None:
        """Seconds since the last beat, if that is beyond the limit and something is protected."""
        since = time.monotonic() - self.last_beat
        return since if self.protected and since > self.limit_s else None

    async def fence(self, since: float) -> None:
        """Kill every protected QEMU that still is one, log it, forget them all."""
        victims, self.protected = self.protected, {}
        self.record("fence", since_beat_s=round(since, 3), limit_s=self.limit_s,
                    vms=sorted(victims))  # fmt: skip
        killed = []
        for uuid, pid in victims.items():
            if not process_matches(pid, uuid):
                self.record("skipped", vm=uuid, pid=pid, reason="its cmdline lacks the uuid")
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self.kills += 1
            killed.append((uuid, pid))
            self.record("killed", vm=uuid, pid=pid)
        deadline = time.monotonic() + GONE_WAIT_S
        while killed and time.monotonic() < deadline:
            for uuid, pid in list(killed):
                if not process_matches(pid, uuid):  # ended (a zombie's cmdline is empty)
                    killed.remove((uuid, pid))
                    self.record("gone", vm=uuid, pid=pid)
            await asyncio.sleep(0.01)

    async def serve_client(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:  # fmt: skip
        try:
            while line := await reader.readline():
                writer.write((self.handle(line.decode(errors="replace")) + "\n").encode())
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


def _already_served(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


async def _serve(args: argparse.Namespace, ready_fd: int | None) -> None:
    sock = Path(args.socket)
    guard = FenceGuard(args.limit, Path(args.log))
    stop = asyncio.Event()
    try:
        if _already_served(sock):
            raise FenceGuardError(f"a fence guard already listens on {sock}")
        sock.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(guard.serve_client, path=str(sock))
        sock.chmod(0o600)
        Path(args.pidfile).write_text(f"{os.getpid()}\n")
    except (OSError, FenceGuardError) as exc:
        if ready_fd is not None:
            os.write(ready_fd, f"err cannot start the fence guard: {exc}".encode())
            os.close(ready_fd)
        raise SystemExit(1) from exc
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    guard.record("started", pid=os.getpid(), limit_s=guard.limit_s, socket=str(sock))
    if ready_fd is not None:
        os.write(ready_fd, b"ok")
        os.close(ready_fd)
    try:
        while not stop.is_set():
            since = guard.overdue()
            if since is not None:
                await guard.fence(since)
            if guard.disarmed and not guard.protected:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), GUARD_TICK_S)
    finally:
        server.close()
        guard.record("stopped", protected=len(guard.protected))
        # The socket goes first and the pidfile last: once the pidfile is
        # gone, nothing of this guard is left to find.
        with contextlib.suppress(OSError):
            sock.unlink()
        with contextlib.suppress(OSError):
            Path(args.pidfile).unlink()


def _daemonize() -> int:
    """Fork into a new session; the parent exits once the child is ready (as QEMU's)."""
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        chunks = []
        while chunk := os.read(read_end, 4096):
            chunks.append(chunk)
        answer = b"".join(chunks).decode(errors="replace")
        if answer == "ok":
            os._exit(0)
        sys.stderr.write((answer or "the fence guard exited while starting") + "\n")
        os._exit(1)
    os.close(read_end)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return write_end


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ferry.host.cluster.guard",
                                     description="Kill this node's clustered QEMUs when "
                                     "the agent's heartbeat stops.")  # fmt: skip
    parser.add_argument("--socket", required=True, help="unix socket to listen on")
    parser.add_argument("--limit", type=float, required=True,
                        help="seconds without a beat before it kills")  # fmt: skip
    parser.add_argument("--log", required=True, help="JSON-lines log of what it did")
    parser.add_argument("--pidfile", required=True, help="where it writes its pid")
    parser.add_argument("--daemonize", action="store_true",
                        help="run in the background once listening")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.limit > 0:
        parser.error("--limit must be positive")
    ready_fd = _daemonize() if args.daemonize else None
    asyncio.run(_serve(args, ready_fd))


if __name__ == "__main__":
    main()
