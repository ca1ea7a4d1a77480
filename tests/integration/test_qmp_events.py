"""A VM's QMP channel keeps no history of the events it heard (real QEMU).

qemu.qmp's default listener appends every event to a list that is never
trimmed; a VM's channel lives as long as its QEMU and each replication cycle
brings about ten job events, so the agents grew for as long as they ran.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
from qemu.qmp import EventListener

from ferry.adapters.qemu import Listener, QmpChannel

pytestmark = pytest.mark.integration

ROUNDS = 200


def test_events_heard_for_long_leave_nothing_behind(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-S",
         "-chardev", f"socket,id=qmp,path={sock},server=on,wait=off",
         "-mon", "chardev=qmp,mode=control"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    async def go() -> tuple[int, int, list[EventListener]]:
        channel = QmpChannel(sock, name="events")
        await channel.connect()
        heard = 0
        all_heard = asyncio.Event()

        async def consume() -> None:
            nonlocal heard
            async for _ in channel.events():
                heard += 1
                if heard == 2 * ROUNDS:
                    all_heard.set()

        consumer = asyncio.create_task(consume())
        scoped = 0
        try:
            for _ in range(ROUNDS):
                with channel.listen("RESUME") as waiter:
                    await channel.execute("cont")
                    scoped += await waiter.next(5) is not None
                await channel.execute("stop")
            await all_heard.wait()
            listeners = list(channel._client._listeners)  # what the client still feeds
        finally:
            consumer.cancel()
            await channel.close()
        return heard, scoped, listeners

    try:
        heard, scoped, listeners = asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        qemu.kill()
        qemu.wait()
    assert heard == 2 * ROUNDS and scoped == ROUNDS
    # Left: the client's default listener, which accepts nothing, and the
    # channel's own; neither kept any of the 400 events.
    assert len(listeners) == 2 and isinstance(listeners[1], Listener), listeners
    assert [len(listener.history) for listener in listeners] == [0, 0]
