"""The fence guard as a real process, with real (paused, device-less) QEMUs to protect.

It must kill after its limit and not before, never kill a pid whose command
line no longer carries the VM's UUID, and outlive the agent that started it so
that a new agent takes it over.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid as uuids
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ferry.adapters import qemu
from ferry.errors import FenceGuardError
from ferry.host.cluster.guard import GuardPaths, read_log, stop_guard
from ferry.host.cluster.guard_client import FenceGuardClient

pytestmark = pytest.mark.integration


class Procs:
    """The QEMUs and other processes a test starts; all ended by pid afterwards."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.qemus: list[tuple[int, str]] = []
        self.others: list[subprocess.Popen[bytes]] = []
        self.guards: list[GuardPaths] = []

    def qemu(self) -> tuple[str, int]:
        """A cheap real QEMU (paused, no devices) carrying a fresh UUID."""
        uuid = str(uuids.uuid4())
        pidfile = self.work / f"{uuid}.pid"
        argv = ["qemu-system-x86_64", "-S", "-display", "none", "-machine", "none",
                "-nodefaults", "-m", "16", "-uuid", uuid, "-daemonize",
                "-pidfile", str(pidfile)]  # fmt: skip
        pid = asyncio.run(qemu.launch(argv, pidfile=pidfile, uuid=uuid))
        self.qemus.append((pid, uuid))
        return uuid, pid

    def popen(self, argv: list[str], *, stdin: bool = False) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                stdout=subprocess.PIPE)  # fmt: skip
        self.others.append(proc)
        return proc

    def paths(self, name: str) -> GuardPaths:
        paths = GuardPaths.of_host(name, self.work, self.work)
        self.guards.append(paths)
        return paths

    def cleanup(self) -> None:
        for paths in self.guards:
            stop_guard(paths)
        for pid, uuid in self.qemus:
            asyncio.run(qemu.kill_process(pid, uuid))
        for proc in self.others:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdout, proc.stdin):
                if stream is not None:
                    stream.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    # Unix socket paths are short: keep the guard's dir short too.
    work = Path(f"/tmp/fg-{os.getpid()}-{time.monotonic_ns() % 10**6}")
    work.mkdir()
    tracked = Procs(work)
    try:
        yield tracked
    finally:
        tracked.cleanup()
        subprocess.run(["rm", "-rf", str(work)], check=True)


async def beat_for(client: FenceGuardClient, seconds: float, every: float = 0.2) -> float:
    """Beat for ``seconds``; return the monotonic time of the last beat's reply."""
    end = time.monotonic() + seconds
    last = time.monotonic()
    while time.monotonic() < end:
        await client.beat()
        last = time.monotonic()
        await asyncio.sleep(every)
    return last


async def wait_gone(pid: int, uuid: str, timeout: float) -> float:
    """Poll until the QEMU is gone; the monotonic time it was first seen gone."""
    deadline = time.monotonic() + timeout
    while qemu.process_matches(pid, uuid):
        assert time.monotonic() < deadline, f"QEMU {pid} still runs after {timeout}s"
        await asyncio.sleep(0.01)
    return time.monotonic()


def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout}s for {what}"
        time.sleep(0.01)


LIMIT = 1.0


def test_the_guard_kills_after_its_limit_and_not_before(procs: Procs) -> None:
    (u1, p1), (u2, p2) = procs.qemu(), procs.qemu()
    paths = procs.paths("host-a")

    async def main() -> None:
        client = FenceGuardClient(paths, limit_s=LIMIT)
        guard_pid = await client.ensure_running()
        await client.protect(u1, p1)
        await client.protect(u2, p2)
        # Beating keeps them alive well past the limit.
        last = await beat_for(client, 3 * LIMIT)
        assert qemu.process_matches(p1, u1) and qemu.process_matches(p2, u2)
        last_wall = time.time() - (time.monotonic() - last)
        gone = [await wait_gone(p, u, 3 * LIMIT) for u, p in ((u1, p1), (u2, p2))]
        assert min(gone) - last >= LIMIT, "killed before the limit"
        assert max(gone) - last < LIMIT + 1.0, "killed far too late"
        status = await client.status()
        assert status["protected"] == {} and status["kills"] == 2
        assert status["pid"] == guard_pid
        await client.close()
        # The guard logs a QEMU "gone" once it saw it end, which may be a moment
        # after the test saw it: read the log once both are there (bounded).
        deadline = time.monotonic() + 5
        records = read_log(paths.log)
        while sum(r["event"] == "gone" for r in records) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            records = read_log(paths.log)
        kinds = [r["event"] for r in records]
        assert kinds[:3] == ["started", "protect", "protect"]
        (fence,) = [r for r in records if r["event"] == "fence"]
        assert fence["since_beat_s"] > LIMIT and sorted(fence["vms"]) == sorted([u1, u2])
        killed = {r["vm"]: r for r in records if r["event"] == "killed"}
        ended = {r["vm"]: r for r in records if r["event"] == "gone"}
        assert set(killed) == set(ended) == {u1, u2}
        for vm in (u1, u2):
            assert killed[vm]["at"] >= last_wall + LIMIT - 0.05
            assert ended[vm]["at"] >= killed[vm]["at"]

    asyncio.run(main())


# A process that carries the UUID on its command line, then (told so on its
# stdin) execs into one that does not, keeping its pid: what a recycled pid
# looks like to the guard.
SHAPESHIFTER = textwrap.dedent("""
    import os, sys
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    sys.stdin.readline()
    os.execvp("sleep", ["sleep", "60"])
""")


def test_the_guard_never_kills_a_pid_whose_cmdline_lacks_the_uuid(procs: Procs) -> None:
    real_uuid, real_pid = procs.qemu()
    other_uuid = str(uuids.uuid4())
    shifter = procs.popen([sys.executable, "-c", SHAPESHIFTER, other_uuid], stdin=True)
    assert shifter.stdout is not None and shifter.stdout.readline() == b"ready\n"
    paths = procs.paths("host-b")

    async def main() -> None:
        client = FenceGuardClient(paths, limit_s=LIMIT)
        await client.ensure_running()
        # A pid that does not run the UUID is refused outright.
        with pytest.raises(FenceGuardError, match=f"does not run VM {real_uuid}"):
            await client.protect(real_uuid, shifter.pid)
        await client.protect(other_uuid, shifter.pid)
        await client.protect(real_uuid, real_pid)
        assert shifter.stdin is not None
        shifter.stdin.write(b"go\n")
        shifter.stdin.flush()
        await asyncio.to_thread(until, lambda: not qemu.process_matches(shifter.pid, other_uuid),
                                "the shapeshifter to exec")  # fmt: skip
        last = await beat_for(client, 0.5)
        # Same pid, no UUID now.
        await wait_gone(real_pid, real_uuid, 3 * LIMIT)
        assert time.monotonic() - last >= LIMIT
        await asyncio.sleep(0.2)
        assert shifter.poll() is None, "the guard killed a process that is not the VM's"
        await client.close()
        records = read_log(paths.log)
        skipped = [r for r in records if r["event"] == "skipped"]
        assert [(r["vm"], r["pid"]) for r in skipped] == [(other_uuid, shifter.pid)]
        assert [r["vm"] for r in records if r["event"] == "killed"] == [real_uuid]

    asyncio.run(main())


AGENT = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from ferry.host.cluster.guard import GuardPaths
    from ferry.host.cluster.guard_client import FenceGuardClient

    async def main():
        work, uuid, pid, limit = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
        client = FenceGuardClient(GuardPaths.of_host("host-c", work, work), limit_s=float(limit))
        guard = await client.ensure_running()
        await client.protect(uuid, pid)
        await client.beat()
        print(guard, flush=True)
        while True:
            await asyncio.sleep(0.2)
            await client.beat()

    asyncio.run(main())
""")


def test_the_guard_outlives_its_agent_and_a_new_agent_takes_it_over(procs: Procs) -> None:
    uuid, pid = procs.qemu()
    paths = procs.paths("host-c")
    limit = 2.0
    agent = procs.popen([sys.executable, "-c", AGENT, str(procs.work), uuid, str(pid), str(limit)])
    assert agent.stdout is not None
    guard_pid = int(agent.stdout.readline())
    assert paths.pid() == guard_pid
    assert os.getsid(guard_pid) != os.getsid(agent.pid), "the guard shares the agent's session"
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    killed_at = time.monotonic()

    async def main() -> None:
        client = FenceGuardClient(paths, limit_s=limit)
        assert await client.ensure_running() == guard_pid, "a second guard was started"
        status = await client.status()
        assert status["protected"] == {uuid: pid}
        # The new agent learns what it runs and beats: nothing is killed.
        await client.sync({uuid: pid})
        last = await beat_for(client, 2.5 * limit)
        assert time.monotonic() - killed_at > limit
        assert qemu.process_matches(pid, uuid), "killed while a new agent beat"
        assert read_log(paths.log)[-1]["event"] != "fence"
        # The new agent's beats stop in turn: now it kills.
        await wait_gone(pid, uuid, 3 * limit)
        assert time.monotonic() - last >= limit
        await client.close()

    asyncio.run(main())


def test_a_killed_guard_is_started_again_and_told_what_it_protects(procs: Procs) -> None:
    uuid, pid = procs.qemu()
    paths = procs.paths("host-d")

    async def main() -> None:
        client = FenceGuardClient(paths, limit_s=5.0)
        first = await client.ensure_running()
        await client.protect(uuid, pid)
        # Only one guard per socket.
        second = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "ferry.host.cluster.guard", "--daemonize", "--socket",
             str(paths.socket), "--limit", "5", "--log", str(paths.log),
             "--pidfile", str(procs.work / "other.pid")],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert second.returncode == 1
        assert second.stderr.strip().splitlines() == [
            f"err cannot start the fence guard: a fence guard already listens on {paths.socket}"
        ]
        os.kill(first, signal.SIGKILL)
        await asyncio.to_thread(until, lambda: paths.pid() != first, "the guard to die")
        await client.beat()
        status = await client.status()
        assert status["pid"] != first
        assert status["protected"] == {uuid: pid}
        # Disarmed with nothing protected, it exits and leaves nothing behind.
        await client.disarm()
        await asyncio.to_thread(until, lambda: paths.pid() is None, "a disarmed guard to exit")
        assert not paths.socket.exists() and not paths.pidfile.exists()
        assert qemu.process_matches(pid, uuid), "disarming killed a QEMU"

    asyncio.run(main())
