"""Continuous replication benchmark: N VMs every 5 s, the RPO they achieve, merges running.

Run: ``.venv/bin/python bench/bench_continuous_replication.py [--vms 10] [--duration 180]``

A two-host lab with ``test_monitor`` (see ``bench/inject.py``); N test
guests (128 MiB RAM, 64 MiB disk) are created on host-1 and paused at once,
so their QEMUs cost little, and each is replicated to host-2 with
``--frequency 5s --recovery-points 24``. For ``--duration`` seconds every
VM gets ``--write-kib`` KiB of new data every second over its test monitor
(HMP ``qemu-io``), and each VM's ``rpo_s`` is sampled every second.

Printed: the p50/p99/max of the sampled RPO over all VMs (goal: p99 < 15 s),
the largest ``rpo_p99_s`` that ``replication status`` reports, cycles ok /
missed / failed in the window, cycle durations, and how late cycles started
(the gaps between consecutive recovery points minus the 5 s period, read
from the replica's points of the last minute every 15 s: thinning never drops those,
so each gap is one cycle) while the replica merged and thinned points in the background (the
merges and thinnings counted from host-2's agent log). The baseline is the
period itself: an RPO can never be under one period plus one cycle.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from bench_replication_fleet import (
    cpu_snapshot,
    cpu_used,
    create_cheap,
    enable_all,
    ferry,
    note,
    percentile,
    qemu_pids,
)
from inject import TestMonitor, monitor_socket

from ferry.client.fleet import Fleet
from ferry.client.settings import load_settings
from ferry.lab import Lab

PERIOD_S = 5
POINTS_EVERY_S = 15.0


async def writer(sockets: dict[str, Path], kib: int, stop: asyncio.Event) -> int:
    """``kib`` KiB into every VM each second; the bytes written."""
    written = 0
    monitors = [TestMonitor(sock, name) for name, sock in sockets.items()]
    for mon in monitors:
        await mon.__aenter__()
    try:
        second = 0
        while not stop.is_set():
            for i, mon in enumerate(monitors):
                offset = ((second * 13 + i * 7) % 60) * 1024**2
                await mon.write(offset, kib * 1024, pattern=second % 250 + 1)
                written += kib * 1024
            second += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        for mon in monitors:
            await mon.__aexit__(None, None, None)
    return written


async def observe(names: list[str], duration: float,
                  sockets: dict[str, Path], kib: int) -> dict[str, Any]:  # fmt: skip
    rpo: list[float] = []
    gaps: dict[str, set[tuple[float, float]]] = {n: set() for n in names}
    stop = asyncio.Event()
    write_task = asyncio.create_task(writer(sockets, kib, stop))
    async with Fleet(load_settings()) as fleet:
        host = fleet.client("host-1")

        async def statuses() -> dict[str, dict[str, Any]]:
            found = await asyncio.gather(*(host.get(f"/v1/vms/{n}/replication") for n in names))
            return dict(zip(names, found, strict=True))

        async def read_gaps() -> None:
            lists = await asyncio.gather(
                *(host.get(f"/v1/vms/{n}/replication/points") for n in names)
            )
            now = time.time()
            for name, points in zip(names, lists, strict=True):
                # Only points of the last minute: thinning never drops those, so
                # each gap is between two consecutive cycles.
                times = sorted(p["time"] for p in points if now - p["time"] <= 55)
                gaps[name].update(itertools.pairwise(times))

        first = await statuses()
        started = time.monotonic()
        next_points = started + POINTS_EVERY_S
        while time.monotonic() - started < duration:
            await asyncio.sleep(1.0)
            for status in (await statuses()).values():
                if status.get("rpo_s") is not None:
                    rpo.append(status["rpo_s"])
            if time.monotonic() >= next_points:
                await read_gaps()
                next_points += POINTS_EVERY_S
        await read_gaps()
        last = await statuses()
        stop.set()
        written = await write_task
    return {"rpo": rpo, "gaps": gaps, "first": first, "last": last, "written": written,
            "window_s": time.monotonic() - started}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=10)
    parser.add_argument("--duration", type=int, default=180, help="seconds observed")
    parser.add_argument("--write-kib", type=int, default=64, help="KiB per VM per second")
    args = parser.parse_args()
    names = [f"c{i:02d}" for i in range(1, args.vms + 1)]
    with tempfile.TemporaryDirectory(prefix="ferry-bench-cr-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        os.environ["FERRY_HOME"] = str(root / "home")
        lab = Lab(root / "lab")
        try:
            note("bringing up 2 lab hosts")
            lab.up(2, host_settings={"test_monitor": True})
            ferry("replica-server", "enable", "--host", "host-2",
                  "--storage", str(root / "replicas"), "--allow", "host-1")  # fmt: skip
            create_cheap(names)
            enable_all(names, f"{PERIOD_S}s", workers=4, extra=("--recovery-points", "24"))
            vms = json.loads(ferry("vm", "list", "--host", "host-1", "--json"))
            sockets = {v["name"]: monitor_socket(lab.root, "host-1", v["uuid"]) for v in vms}
            hosts = json.loads(ferry("lab", "status", "--json"))["hosts"]
            agents = {h["name"]: h["pid"] for h in hosts}
            qemus = qemu_pids(lab)
            cpu_before = cpu_snapshot(agents, qemus)
            note(f"observing {args.duration} s")
            got = asyncio.run(observe(names, args.duration, sockets, args.write_kib))
            cpu = cpu_used(cpu_before, cpu_snapshot(agents, qemus))
            log = (lab.root / "hosts" / "host-2" / "agent.log").read_text(errors="replace")
        finally:
            lab.down()

    first, last, window = got["first"], got["last"], got["window_s"]
    rpo = sorted(got["rpo"])
    counts = {k: sum(last[n][k] - first[n][k] for n in names)
              for k in ("success_count", "miss_count", "failure_count")}  # fmt: skip
    late = sorted(max(0.0, b - a - PERIOD_S) for n in names for a, b in got["gaps"][n])
    stats = [last[n]["statistics"] for n in names]
    print(f"VMs: {len(names)} paused on host-1 -> host-2 every {PERIOD_S} s, recovery points 24, "
          f"observed {window:.0f} s, {got['written'] / 1024**2:.0f} MiB written "
          f"({args.write_kib} KiB per VM per second); load at the end: "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    if rpo:
        print(f"RPO sampled every 1 s per VM: p50 {percentile(rpo, 50):.1f} s, "
              f"p99 {percentile(rpo, 99):.1f} s, max {rpo[-1]:.1f} s (goal p99 < 15 s; "
              f"p99 / period = {percentile(rpo, 99) / PERIOD_S:.2f})")  # fmt: skip
    reported = [last[n]["rpo_p99_s"] for n in names if last[n].get("rpo_p99_s") is not None]
    if reported:
        print(f"replication status rpo_p99_s (peaks, last 15 min): max over VMs "
              f"{max(reported):.1f} s, median {statistics.median(reported):.1f} s")  # fmt: skip
    print(f"cycles in the window: ok {counts['success_count']}, missed {counts['miss_count']}, "
          f"failed {counts['failure_count']}")  # fmt: skip
    print(f"cycle duration: average over VMs "
          f"{statistics.mean(s['average_cycle_s'] or 0 for s in stats):.2f} s, longest "
          f"{max(s['max_cycle_s'] or 0 for s in stats):.2f} s")  # fmt: skip
    if late:
        print(f"cycle start delay (gap between points - {PERIOD_S} s, {len(late)} gaps): "
              f"p50 {percentile(late, 50):.2f} s, p99 {percentile(late, 99):.2f} s, "
              f"max {late[-1]:.2f} s")  # fmt: skip
    print(
        f"replica retention meanwhile: {log.count('merged recovery point')} merges, "
        f"{log.count('thinned recovery point')} thinnings (in the background)"
    )
    agent = cpu["host-1 agent"] + cpu["host-1 agent's children"]
    replica = cpu["host-2 agent"] + cpu["host-2 agent's children"]
    per_cycle = 1000 * agent / max(1, counts["success_count"])
    print(
        f"agent CPU: primary {agent:.1f} s ({per_cycle:.0f} ms per cycle), replica "
        f"{replica:.1f} s, all QEMUs {cpu['all QEMUs']:.1f} s"
    )


if __name__ == "__main__":
    main()
