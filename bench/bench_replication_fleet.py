"""Replication fleet benchmark: sustained 30 s cycles for N VMs on one host.

Run: ``.venv/bin/python bench/bench_replication_fleet.py [--vms 20] [--duration 300]``

A two-host lab; host-2 is made a replica server and N test guests (128 MiB
RAM, 64 MiB disk, each writing a 4 KiB record every 200 ms, so every delta is
small but never empty) are created on host-1 one after another, then each is
protected with ``ferry replication enable --replica host-2 --frequency 30s``.
Everything goes through the real ``ferry`` CLI, as an admin would do it.

Then, for ``--duration`` seconds (at least 60), the replication status of
every VM is read every 5 s (one client process, not N CLI start-ups per
round) and its ``lag_s`` (seconds since the latest recovery point's point in
time) kept. Prints lag p50/p90/p99/max over all samples, the p99 lag as a
multiple of the frequency, the cycles each VM ran (ok / missed / failed) and
their average and longest duration, how many VMs ever lagged more than one
period plus their own longest cycle (head-of-line blocking), and the CPU time
the two agents and all QEMUs used during the observation window.
``BENCH_VERBOSE=1`` adds progress on stderr and a row per VM.

``--cheap`` (issue 18 item 5: 50 VMs on this 2-core host, where about 6 TCG
guests saturate it): the hosts run with ``test_monitor`` and every VM is
paused right after its start, so its QEMU costs almost nothing; during the
window each VM gets ``--write-kib`` KiB of fresh data every 10 s, written
into its running disk over its test monitor (HMP ``qemu-io``, see
``bench/inject.py``), so every cycle has a delta to cut, send and link. It
also prints the agent's CPU per cycle: host-1's agent (and its children)
utime+stime over the window, from ``/proc/PID/stat``, divided by the cycles
that succeeded in it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ferry.client.fleet import Fleet
from ferry.client.settings import load_settings
from ferry.lab import Lab

FREQUENCY = "30s"
SAMPLE_EVERY_S = 5.0
MIN_DURATION_S = 60
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
VERBOSE = bool(os.environ.get("BENCH_VERBOSE"))


def note(text: str) -> None:
    if VERBOSE:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def ferry(*args: str) -> str:
    """Run the ferry CLI; on failure show ferry's own message, not just the exit code."""
    argv = [sys.executable, "-m", "ferry", *args]
    done = subprocess.run(argv, text=True, capture_output=True, env=dict(os.environ))
    if done.returncode != 0:
        raise RuntimeError(f"'ferry {' '.join(args)}' exited {done.returncode}: "
                           f"{done.stderr.strip() or done.stdout.strip()}")  # fmt: skip
    return done.stdout


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(own utime+stime, reaped children's cutime+cstime) of ``pid``; zeros once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0, 0.0
    # After the ")" field 3 (state) is index 0, so utime..cstime (14..17) are 11..14.
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime) / CLOCK_TICKS, (cutime + cstime) / CLOCK_TICKS


def qemu_pids(lab: Lab) -> list[int]:
    pids = []
    for pidfile in lab.root.glob("hosts/*/data/vms/*/qemu.pid"):
        text = pidfile.read_text().strip()
        if text.isdigit() and Path(f"/proc/{text}").exists():
            pids.append(int(text))
    return pids


def cpu_snapshot(agents: dict[str, int], qemus: list[int]) -> dict[str, float]:
    """CPU seconds so far: each agent itself, the helpers it ran (qemu-img...), each QEMU."""
    snap: dict[str, float] = {}
    for name, pid in agents.items():
        snap[f"{name} agent"], snap[f"{name} agent's children"] = cpu_seconds(pid)
    for pid in qemus:
        snap[f"qemu {pid}"] = cpu_seconds(pid)[0]
    return snap


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    # A process gone by the end reads as zero; count none rather than a negative share.
    used = {k: max(0.0, after[k] - before[k]) for k in before if not k.startswith("qemu ")}
    used["all QEMUs"] = sum(max(0.0, after[k] - before[k]) for k in before
                            if k.startswith("qemu "))  # fmt: skip
    return used


def percentile(ordered: list[float], q: int) -> float:
    if len(ordered) < 2:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[q - 1]


Statuses = dict[str, dict[str, Any]]  # VM name -> GET /v1/vms/NAME/replication


WRITE_EVERY_S = 10.0


async def write_loop(sockets: dict[str, Path], kib: int, stop: asyncio.Event,
                     written: list[int]) -> None:  # fmt: skip
    """Every WRITE_EVERY_S, ``kib`` KiB of new data into each VM's disk (spread over the period)."""
    from inject import TestMonitor

    monitors = [TestMonitor(sock, name) for name, sock in sockets.items()]
    for mon in monitors:
        await mon.__aenter__()
    try:
        rounds = 0
        while not stop.is_set():
            gap = WRITE_EVERY_S / max(1, len(monitors))
            for mon in monitors:
                offset = ((rounds * 37 + hash(mon.name)) % 60) * 1024**2
                await mon.write(offset, kib * 1024, pattern=rounds % 250 + 1)
                written[0] += kib * 1024
                try:
                    await asyncio.wait_for(stop.wait(), gap)
                    return
                except TimeoutError:
                    pass
            rounds += 1
    finally:
        for mon in monitors:
            await mon.__aexit__(None, None, None)


async def observe(
    names: list[str],
    duration: float,
    sockets: dict[str, Path] | None = None,
    write_kib: int = 0,
    written: list[int] | None = None,
) -> tuple[dict[str, list[float | None]], Statuses, Statuses]:
    """Lag samples per VM every SAMPLE_EVERY_S, plus each VM's status at start and end.

    ``sockets``: the VMs' test monitors, written into while observing.
    """
    samples: dict[str, list[float | None]] = {name: [] for name in names}
    stop = asyncio.Event()
    writer = (asyncio.create_task(write_loop(sockets, write_kib, stop, written or [0]))
              if sockets else None)  # fmt: skip
    try:
        return await _observe(names, duration, samples)
    finally:
        stop.set()
        if writer is not None:
            await writer


async def _observe(
    names: list[str], duration: float, samples: dict[str, list[float | None]]
) -> tuple[dict[str, list[float | None]], Statuses, Statuses]:
    async with Fleet(load_settings()) as fleet:
        host = fleet.client("host-1")

        async def round_() -> Statuses:
            found = await asyncio.gather(*(host.get(f"/v1/vms/{n}/replication") for n in names))
            return dict(zip(names, found, strict=True))

        first = last = await round_()
        started = time.monotonic()
        rounds = 0
        while True:
            for name, status in last.items():
                samples[name].append(status["lag_s"])
            rounds += 1
            next_at = started + rounds * SAMPLE_EVERY_S
            if next_at > started + duration:
                break
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            last = await round_()
            if rounds % 6 == 0:
                lags = [s["lag_s"] for s in last.values() if s["lag_s"] is not None]
                note(f"{rounds * SAMPLE_EVERY_S:.0f} s: max lag now {max(lags, default=0):.1f} s")
    return samples, first, last


def create_cheap(names: list[str], *, workers: int = 4) -> None:
    """Create, start and at once pause the VMs (cheap QEMUs), from one client process.

    Through the API rather than one CLI process per step: on a loaded 2-core
    host the CLI's start-up, and the guest booting until a separate ``vm
    pause`` runs, cost more than the replication measured afterwards.
    """

    async def run() -> None:
        gate = asyncio.Semaphore(workers)
        async with Fleet(load_settings()) as fleet:
            host = fleet.client("host-1")

            async def one(name: str) -> None:
                async with gate:
                    note(f"creating {name}")
                    disk = {"size": 64 * 1024**2}
                    body = {"name": name, "memory": 128 * 1024**2, "disks": [disk], "guest": "test"}
                    await host.call("POST", "/v1/vms", body=body)
                    await host.post(f"/v1/vms/{name}/start")
                    await host.post(f"/v1/vms/{name}/pause")

            await asyncio.gather(*(one(name) for name in names))

    asyncio.run(run())


def enable_all(names: list[str], frequency: str, *, workers: int = 1,
               extra: tuple[str, ...] = ()) -> list[float]:  # fmt: skip
    """``replication enable`` of every VM to host-2; the seconds each took."""

    def one(name: str) -> float:
        note(f"enabling replication of {name}")
        started = time.monotonic()
        out = ferry("replication", "enable", name, "--replica", "host-2",
                    "--frequency", frequency, *extra, "--json")  # fmt: skip
        final = json.loads(out.strip().splitlines()[-1])
        if final.get("error"):
            note(f"{name}: enable returned error {final['error']!r}")
        return time.monotonic() - started

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=20)
    parser.add_argument("--duration", type=int, default=300, help="seconds observed (>= 60)")
    parser.add_argument(
        "--cheap", action="store_true", help="paused VMs, writes injected over their test monitors"
    )
    parser.add_argument(
        "--write-kib",
        type=int,
        default=256,
        help="with --cheap: KiB written into each VM every 10 s",
    )
    args = parser.parse_args()
    if args.duration < MIN_DURATION_S:
        parser.error(f"--duration must be at least {MIN_DURATION_S} s (two 30 s periods)")
    if args.vms < 1:
        parser.error("--vms must be at least 1")
    names = [f"v{i:02d}" for i in range(1, args.vms + 1)]

    with tempfile.TemporaryDirectory(prefix="ferry-bench-rf-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        os.environ["FERRY_HOME"] = str(root / "home")
        lab = Lab(root / "lab")
        try:
            note("bringing up 2 lab hosts")
            lab.up(2, host_settings={"test_monitor": True} if args.cheap else None)
            ferry("replica-server", "enable", "--host", "host-2",
                  "--storage", str(root / "replicas"), "--allow", "host-1")  # fmt: skip
            setup_started = time.monotonic()
            if args.cheap:
                create_cheap(names)
            else:
                for name in names:
                    note(f"creating {name}")
                    ferry("vm", "create", name, "--host", "host-1", "--guest", "test",
                          "--memory", "128M", "--disk", "64M", "--start")  # fmt: skip
                    ferry("vm", "console", name, "--follow", "--until", "seq 2", "--timeout", "5m")
            create_s = time.monotonic() - setup_started
            enable_s = enable_all(names, FREQUENCY, workers=4 if args.cheap else 1)
            hosts = json.loads(ferry("lab", "status", "--json"))["hosts"]
            agents = {h["name"]: h["pid"] for h in hosts}
            qemus = qemu_pids(lab)
            note(f"observing {args.duration} s (agents {agents}, {len(qemus)} QEMUs)")
            cpu_before = cpu_snapshot(agents, qemus)
            window_started = time.monotonic()
            sockets = None
            if args.cheap:
                from inject import monitor_socket

                vms = json.loads(ferry("vm", "list", "--host", "host-1", "--json"))
                sockets = {v["name"]: monitor_socket(lab.root, "host-1", v["uuid"]) for v in vms}
            written = [0]
            samples, first, last = asyncio.run(observe(names, args.duration, sockets,
                                                       args.write_kib, written))  # fmt: skip
            window_s = time.monotonic() - window_started
            cpu_after = cpu_snapshot(agents, qemus)
        finally:
            lab.down()

    lags = sorted(v for per_vm in samples.values() for v in per_vm if v is not None)
    missing = sum(v is None for per_vm in samples.values() for v in per_vm)
    frequency_s = last[names[0]]["frequency_s"]
    totals = {k: sum(last[n][k] for n in names) for k in
              ("success_count", "miss_count", "failure_count")}  # fmt: skip
    in_window = {k: totals[k] - sum(first[n][k] for n in names) for k in totals}
    stats = [last[n]["statistics"] for n in names]
    averages = [s["average_cycle_s"] for s in stats if s["average_cycle_s"] is not None]
    longest = [s["max_cycle_s"] for s in stats if s["max_cycle_s"] is not None]
    # Head-of-line blocking: a VM whose lag ever exceeded one period plus its own longest cycle.
    blocked = [n for n, s in zip(names, stats, strict=True)
               if any(v is not None and v > frequency_s + (s["max_cycle_s"] or 0)
                      for v in samples[n])]  # fmt: skip

    if VERBOSE:
        for n, s in zip(names, stats, strict=True):
            vm_lags = [v for v in samples[n] if v is not None]
            print(f"  {n}: lag max {max(vm_lags, default=float('nan')):5.1f} s, "
                  f"ok/miss/fail {last[n]['success_count']}/{last[n]['miss_count']}/"
                  f"{last[n]['failure_count']}, cycle avg {s['average_cycle_s'] or 0:.2f} s "
                  f"max {s['max_cycle_s'] or 0:.2f} s, state {last[n]['state']} "
                  f"({last[n]['health']})")  # fmt: skip
    print(f"VMs: {len(names)} on host-1 -> host-2, frequency {frequency_s} s, "
          f"observed {window_s:.0f} s (setup: create+boot {create_s:.0f} s, enable median "
          f"{statistics.median(enable_s):.1f} s / max {max(enable_s):.1f} s)")  # fmt: skip
    print(f"lag samples: {len(lags)} (every {SAMPLE_EVERY_S:.0f} s per VM; "
          f"{missing} without a recovery point yet)")  # fmt: skip
    if lags:
        p99 = percentile(lags, 99)
        print(f"lag: p50 {percentile(lags, 50):.1f} s, p90 {percentile(lags, 90):.1f} s, "
              f"p99 {p99:.1f} s, max {lags[-1]:.1f} s; p99 / frequency = "
              f"{p99 / frequency_s:.2f}")  # fmt: skip
    print(f"cycles (totals since enable): ok {totals['success_count']}, "
          f"missed {totals['miss_count']}, failed {totals['failure_count']}; "
          f"in the window: ok {in_window['success_count']}, missed {in_window['miss_count']}, "
          f"failed {in_window['failure_count']} "
          f"({in_window['success_count'] / len(names):.1f} ok per VM)")  # fmt: skip
    if averages:
        print(f"cycle duration: average over VMs {statistics.mean(averages):.2f} s, "
              f"longest {max(longest):.2f} s")  # fmt: skip
    which = f" ({', '.join(blocked)})" if blocked else ""
    print(f"VMs whose lag exceeded one period + their longest cycle: {len(blocked)}{which}")
    cpu = cpu_used(cpu_before, cpu_after)
    if args.cheap:
        agent = cpu["host-1 agent"] + cpu["host-1 agent's children"]
        replica = cpu["host-2 agent"] + cpu["host-2 agent's children"]
        ok = max(1, in_window["success_count"])
        print(
            f"writes injected: {written[0] / 1024**2:.0f} MiB over the window "
            f"({args.write_kib} KiB per VM every {WRITE_EVERY_S:.0f} s, VMs paused)"
        )
        print(f"agent CPU per cycle: primary (host-1 agent + children) {1000 * agent / ok:.0f} ms, "
              f"replica (host-2) {1000 * replica / ok:.0f} ms, over {ok} cycles")  # fmt: skip
    print(f"CPU over the {window_s:.0f} s window: "
          + ", ".join(f"{k} {v:.1f} s ({100 * v / window_s:.0f}% of a core)"
                      for k, v in cpu.items()))  # fmt: skip


if __name__ == "__main__":
    main()
