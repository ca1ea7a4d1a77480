"""The guest agent adapter and the freeze window against a fake qemu-ga on a unix socket.

What matters is what a guest lives through: every call ends within its
bound, errors arrive as GuestAgentError, and a frozen guest is always thawed
(at the cut, by the watchdog, after a failure, after a cancellation).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from ferry.adapters.guest_agent import GuestAgent
from ferry.errors import FerryError, GuestAgentError
from ferry.host.replication.freeze import FreezeWindow
from ferry.testing.guest_agent import FakeGuestAgent


@pytest.fixture
def sock() -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="ga", dir="/tmp"))  # unix socket paths are short
    yield where / "qga.sock"
    shutil.rmtree(where, ignore_errors=True)


def run(fake: FakeGuestAgent, body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        async with fake:
            await asyncio.wait_for(body(), 10)

    asyncio.run(main())


def test_ping_freeze_thaw_and_a_stale_reply_before_the_sync(sock: Path) -> None:
    fake = FakeGuestAgent(sock, stale=b'{"return": "left by an earlier client"}\n')

    async def body() -> None:
        async with GuestAgent(sock, vm="web") as agent:
            await agent.ping()
            assert await agent.freeze() == 1
            assert await agent.freeze_status() == "frozen"
            assert await agent.thaw() == 1
            assert await agent.freeze_status() == "thawed"

    run(fake, body)
    assert fake.commands[0] == "guest-sync-delimited" and not fake.frozen


def test_a_silent_agent_is_one_error_within_the_bound(sock: Path) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(GuestAgentError, match="is qemu-guest-agent running in the guest"):
            async with GuestAgent(sock, vm="web", sync_timeout=0.3):
                pass
        assert loop.time() - started < 2

    run(FakeGuestAgent(sock, silent=True), body)


def test_no_socket_and_refusals_are_guest_agent_errors(sock: Path) -> None:
    async def missing() -> None:
        with pytest.raises(GuestAgentError, match="--guest-agent"):
            async with GuestAgent(sock.with_name("nothing.sock"), vm="web"):
                pass

    async def refused() -> None:
        async with GuestAgent(sock, vm="web") as agent:
            with pytest.raises(GuestAgentError, match="refused: no freezing today") as caught:
                await agent.freeze()
            assert caught.value.error_class == "GenericError"
            assert caught.value.command == "guest-fsfreeze-freeze"
            await agent.ping()  # the session goes on after an error reply

    run(FakeGuestAgent(sock), missing)
    run(FakeGuestAgent(sock, refuse={"guest-fsfreeze-freeze": "no freezing today"}), refused)


def test_shutdown_has_no_reply_when_it_works(sock: Path) -> None:
    fake = FakeGuestAgent(sock)

    async def body() -> None:
        async with GuestAgent(sock, vm="web") as agent:
            await agent.shutdown()

    run(fake, body)
    assert fake.commands[-1] == "guest-shutdown"


def test_the_transaction_inside_the_window_is_app_consistent_and_thawed_after(sock: Path) -> None:
    fake = FakeGuestAgent(sock)
    seen: list[bool] = []

    async def body() -> None:
        window = FreezeWindow(sock, vm="web")
        assert not window.attempted
        async with window:  # as BlockBackup.run holds it around the transaction
            seen.append(fake.frozen)
        seen.append(fake.frozen)
        assert window.attempted and window.app_consistent and window.error is None
        assert window.frozen_s is not None and window.frozen_s < 1

    run(fake, body)
    assert seen == [True, False] and fake.freezes == 1 and not fake.frozen


def test_a_failed_freeze_lets_the_cut_go_on_crash_consistent(sock: Path) -> None:
    for fake in (FakeGuestAgent(sock, refuse={"guest-fsfreeze-freeze": "no fs"}),
                 FakeGuestAgent(sock, silent=True)):  # fmt: skip
        cut: list[bool] = []

        async def body(cut: list[bool] = cut) -> None:
            async with FreezeWindow(sock, vm="web", sync_timeout=0.3) as window:
                cut.append(True)
            assert not window.app_consistent and window.error

        run(fake, body)
        assert cut == [True] and not fake.frozen


def test_a_failure_or_a_cancel_during_the_cut_still_thaws(sock: Path) -> None:
    fake = FakeGuestAgent(sock)

    async def failing() -> None:
        window = FreezeWindow(sock, vm="web")
        with pytest.raises(FerryError, match="transaction failed"):
            async with window:
                assert fake.frozen
                raise FerryError("transaction failed")
        assert not fake.frozen and not window.app_consistent

    async def cancelled() -> None:
        entered = asyncio.Event()

        async def cycle() -> None:
            async with FreezeWindow(sock, vm="web"):
                entered.set()
                await asyncio.sleep(60)

        task = asyncio.create_task(cycle())
        await entered.wait()
        assert fake.frozen
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not fake.frozen

    run(fake, failing)
    run(fake, cancelled)
    assert fake.freezes == 2


def test_the_watchdog_bounds_the_freeze_and_the_late_cut_is_crash_consistent(sock: Path) -> None:
    fake = FakeGuestAgent(sock)

    async def body() -> None:
        async with FreezeWindow(sock, vm="web", limit=0.2) as window:
            await asyncio.sleep(0.6)  # a transaction that hangs
            assert not fake.frozen  # thawed by the watchdog meanwhile
        assert not window.app_consistent
        assert window.error is not None and "within" in window.error

    run(fake, body)
    assert fake.freezes == 1 and not fake.frozen
