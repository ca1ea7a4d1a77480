"""Turns on a VM's disks: one job at a time per VM, in order, others never delayed."""

from __future__ import annotations

import asyncio

from ferry.host.turns import DiskTurns


def test_jobs_on_one_vm_take_turns_and_the_waiting_one_hears_why() -> None:
    turns = DiskTurns()
    order: list[str] = []
    heard: list[str | None] = []

    async def job(vm: str, what: str, hold: float) -> None:
        async with turns.turn(vm, what, waiting=heard.append):
            order.append(f"{what} starts")
            assert turns.holder(vm) == what
            await asyncio.sleep(hold)
            order.append(f"{what} ends")

    async def run() -> None:
        first = asyncio.create_task(job("vm-a", "a replication cycle", 0.05))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(job("vm-a", "a live export", 0.0))
        other = asyncio.create_task(job("vm-b", "a move", 0.0))
        await asyncio.gather(first, second, other)

    asyncio.run(run())
    assert order == [
        "a replication cycle starts",
        "a move starts",
        "a move ends",
        "a replication cycle ends",
        "a live export starts",
        "a live export ends",
    ]
    assert heard == ["waiting for a replication cycle to finish", None]
    assert turns.holder("vm-a") is None


def test_a_cancelled_holder_releases_the_turn() -> None:
    turns = DiskTurns()

    async def run() -> str | None:
        async def hold() -> None:
            async with turns.turn("vm", "a move"):
                await asyncio.sleep(10)

        task = asyncio.create_task(hold())
        await asyncio.sleep(0.01)
        task.cancel()
        async with asyncio.timeout(1), turns.turn("vm", "a live export"):
            return turns.holder("vm")

    assert asyncio.run(run()) == "a live export"
