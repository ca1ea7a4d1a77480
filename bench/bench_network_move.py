"""Network move benchmark: the TCP stall a lab peer sees during a live move, and NICs' cost.

Run: ``.venv/bin/python bench/bench_network_move.py [--moves 5] [--runs 3]
[--only stall|nics]``

Two lab hosts with the lab network, the test guest (128 MiB, one 32 MiB disk).

stall: a VM with one NIC on network ``lab`` (its disk on the lab's ``shared``
       volume); a peer in the lab namespace (``ferry.testing.echo_peer``, run
       through ``ferry lab exec``) keeps one TCP connection to the guest's echo
       port, sending a line every 20 ms. ``--moves`` moves with ``--storage
       shared``, then as many with ``--storage copy``, alternating host-1 and
       host-2. Per move: the longest time between two echoes the peer saw
       during that move (``stall``), next to what the move reported:
       ``downtime_ms`` (QEMU's) and the guest's pause (``downtime_ms`` +
       ``resume_ms``). Per storage: the median and the worst of each, and the
       stall minus the pause (what the network added on top of the pause: TCP
       retransmission, the switch learning the new port).
nics:  a VM with two NICs on ``lab`` against the same VM without NICs, both
       moved host-1 -> host-2 and back ``--runs`` times with ``--storage
       shared`` (the order alternates between runs). Per move the total time
       and downtime; the medians and the ratios two-NICs / no-NIC for total
       time, downtime and pause (the goal: within 1.1). Both are measured in
       this process, so the no-NIC VM is the baseline.

QEMU 7.2 may read a downtime of 0 (its status says 'completed' a moment
before it filled the figure in); the downtime medians leave those out and
say how many. Numbers only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_lab import bench_lab, ferry

from ferry.lab import Lab
from ferry.testing.echo_peer import PeerProcess

HOSTS = ("host-1", "host-2")


def show(home: Path, name: str) -> dict[str, Any]:
    vm: dict[str, Any] = json.loads(ferry(home, "vm", "show", name, "--json"))
    return vm


def wait_console(home: Path, lab: Lab, name: str, text: str, timeout: float = 240) -> None:
    vm = show(home, name)
    log = lab.root / "hosts" / vm["host"] / "data" / "vms" / vm["uuid"] / "serial.log"
    deadline = time.monotonic() + timeout
    while not (log.exists() and text.encode() in log.read_bytes()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{text!r} never appeared in {log}")
        time.sleep(0.2)


def create(home: Path, lab: Lab, name: str, nics: int, *extra: str) -> None:
    args = [arg for _ in range(nics) for arg in ("--nic", "lab")]
    ferry(home, "vm", "create", name, "--host", HOSTS[0], "--guest", "test", "--memory", "128M",
          "--disk", "32M", *args, *extra, "--start")  # fmt: skip
    wait_console(home, lab, name, "ferry-guest net eth0" if nics else "seq 2")


def move(home: Path, name: str, to: str, storage: str) -> dict[str, Any]:
    lines = ferry(home, "vm", "move", name, "--to", to, "--storage", storage, "--json")
    result: dict[str, Any] = json.loads(lines.splitlines()[-1])
    if result.get("result") != "ok":
        raise RuntimeError(f"move of {name} to {to} did not succeed: {result}")
    return result


def phase_seconds(home: Path, name: str, source: str) -> dict[str, float]:
    """How long the VM's last move on ``source`` spent in each phase (its job's record)."""
    jobs = json.loads(ferry(home, "job", "list", "--host", source, "--json"))
    job_id = [j for j in jobs if j["vm"] == name and j["kind"] == "move"][-1]["id"]
    job = json.loads(ferry(home, "job", "show", job_id, "--host", source, "--json"))
    entered = list(job["phase_started"].items())
    return {phase: at_next - at for (phase, at), (_, at_next) in itertools.pairwise(entered)}


def pause_ms(result: dict[str, Any]) -> float:
    return float(result["downtime_ms"] + result["resume_ms"])


def ratio(b: float, a: float) -> str:
    return f"{b / a:.2f}" if a else "nan"


def delete(home: Path, name: str) -> None:
    subprocess.run([sys.executable, "-m", "ferry", "vm", "delete", name, "--force"],
                   env=dict(os.environ, FERRY_HOME=str(home)), check=False,
                   capture_output=True)  # fmt: skip


# -- stall ------------------------------------------------------------------------------


def stall(home: Path, lab: Lab, moves: int) -> None:
    name = "bench-stall"
    create(home, lab, name, 1, "--volume", "shared")
    nic = show(home, name)["nics"][0]
    peer = PeerProcess([sys.executable, "-m", "ferry", "lab", "exec", "--", sys.executable, "-m",
                        "ferry.testing.echo_peer", nic["ip"]])  # fmt: skip
    rows: dict[str, list[tuple[dict[str, Any], float]]] = {"shared": [], "copy": []}
    try:
        ready = peer.wait_ready(180)
        if ready["event"] != "ready":
            raise RuntimeError(f"the peer never got an echo: {ready}")
        where = 0
        for storage in ("shared", "copy"):
            for index in range(moves):
                time.sleep(1.0)  # a quiet second before the move
                before = peer.mark()  # resets the peer's longest stall
                where = 1 - where
                result = move(home, name, HOSTS[where], storage)
                # Until the echoes flow again: a stall is counted when the echo that
                # ends it arrives, in the window of the mark after it.
                deadline = time.monotonic() + 30
                seen = 0.0
                while True:
                    time.sleep(1.0)
                    after = peer.mark()
                    seen = max(seen, after["stall_ms"])
                    if after["received"] > before["received"] + 25 or time.monotonic() > deadline:
                        break
                if after["error"]:
                    raise RuntimeError(f"the peer's connection broke: {after['error']}")
                rows[storage].append((result, seen))
                print(f"stall {storage} move {index + 1} to {HOSTS[where]}: longest stall "
                      f"{seen:.0f} ms; move downtime {result['downtime_ms']} ms, pause "
                      f"{pause_ms(result):.0f} ms, total {result['total_s']:.2f} s",
                      flush=True)  # fmt: skip
        report = peer.stop()
        print(f"stall: one connection for all {2 * moves} moves: sent {report['sent']}, "
              f"echoed {report['received']}, in order {report['in_order']}, "
              f"error {report['error']}")  # fmt: skip
    finally:
        peer.close()
        delete(home, name)
    for storage, found in rows.items():
        stalls = [s for _, s in found]
        timed = [r for r, _ in found if r["downtime_ms"] > 0]
        downs = [r["downtime_ms"] for r in timed] or [0]
        pauses = [pause_ms(r) for r in timed] or [0.0]
        extra = [s - pause_ms(r) for r, s in found if r["downtime_ms"] > 0] or [0.0]
        print(f"stall {storage}, {len(found)} moves ({len(found) - len(timed)} with downtime 0 "
              f"left out of the downtime figures): longest stall median "
              f"{statistics.median(stalls):.0f} ms, worst {max(stalls):.0f} ms; downtime median "
              f"{statistics.median(downs):.0f} ms, worst {max(downs)} ms; pause median "
              f"{statistics.median(pauses):.0f} ms, worst {max(pauses):.0f} ms; stall - pause "
              f"median {statistics.median(extra):.0f} ms", flush=True)  # fmt: skip


# -- nics -------------------------------------------------------------------------------


def nics(home: Path, lab: Lab, runs: int) -> None:
    names = {"none": "bench-nonic", "two": "bench-twonic"}
    create(home, lab, names["none"], 0, "--volume", "shared")
    create(home, lab, names["two"], 2, "--volume", "shared")
    moves: dict[str, list[dict[str, Any]]] = {key: [] for key in names}
    spent: dict[str, list[dict[str, float]]] = {key: [] for key in names}
    try:
        for run in range(runs):
            order = list(names) if run % 2 == 0 else list(reversed(names))
            for key in order:
                for way, source, to in (("there", *HOSTS), ("back", *reversed(HOSTS))):
                    result = move(home, names[key], to, "shared")
                    moves[key].append(result)
                    spent[key].append(phase_seconds(home, names[key], source))
                    phases = ", ".join(f"{p} {s:.2f}" for p, s in spent[key][-1].items())
                    print(f"nics run {run + 1} {key} {way}: total {result['total_s']:.2f} s, "
                          f"downtime {result['downtime_ms']} ms, resume {result['resume_ms']} "
                          f"ms; phases (s): {phases}", flush=True)  # fmt: skip
    finally:
        for name in names.values():
            delete(home, name)
    med: dict[str, dict[str, float]] = {}
    zeros = {}
    for key, found in moves.items():
        timed = [r for r in found if r["downtime_ms"] > 0] or [{"downtime_ms": 0, "resume_ms": 0}]
        zeros[key] = sum(r["downtime_ms"] == 0 for r in found)
        med[key] = {"total": statistics.median(r["total_s"] for r in found),
                    "down": statistics.median(r["downtime_ms"] for r in timed),
                    "pause": statistics.median(pause_ms(r) for r in timed)}  # fmt: skip
    a, b = med["none"], med["two"]
    print(f"nics median of {len(moves['none'])} moves each (downtime 0 read: no NIC "
          f"{zeros['none']}, two NICs {zeros['two']}, left out of downtime and pause): total "
          f"no NIC {a['total']:.2f} s / two NICs {b['total']:.2f} s, ratio "
          f"{ratio(b['total'], a['total'])}; downtime {a['down']:.0f} ms / {b['down']:.0f} ms, "
          f"ratio {ratio(b['down'], a['down'])}; pause {a['pause']:.0f} ms / "
          f"{b['pause']:.0f} ms, ratio {ratio(b['pause'], a['pause'])} (goal: within 1.1)",
          flush=True)  # fmt: skip
    for phase in ("preparing", "copying-memory", "switching-over"):
        times = {key: statistics.median(p.get(phase, 0.0) for p in rows)
                 for key, rows in spent.items()}  # fmt: skip
        print(f"nics median {phase}: no NIC {times['none']:.2f} s / two NICs "
              f"{times['two']:.2f} s, ratio {ratio(times['two'], times['none'])}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moves", type=int, default=5, help="stall: moves per storage")
    parser.add_argument("--runs", type=int, default=3, help="nics: there-and-back runs")
    parser.add_argument("--only", choices=["stall", "nics"], default=None)
    args = parser.parse_args()
    with bench_lab("ferry-bench-network-") as (home, lab):
        if args.only in (None, "stall"):
            stall(home, lab, args.moves)
        if args.only in (None, "nics"):
            nics(home, lab, args.runs)


if __name__ == "__main__":
    main()
