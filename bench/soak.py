"""Soak: many VMs replicating at 30 s for a long time, with a live move every few minutes.

Run: ``.venv/bin/python bench/soak.py [--minutes 60] [--vms 10] [--move-every 300]``

A three-host lab: host-2 is a replica server for host-1 and host-3, and
``--vms`` VMs are created on host-1 and protected with ``ferry replication
enable --replica host-2 --frequency 30s``, all through the real ``ferry`` CLI.
Only the first VM is a TCG test guest (128 MiB, writing a 4 KiB sequence
record every 200 ms); the others are cheap: 64 MiB, an empty 64 MiB disk, no
guest, so SeaBIOS finds nothing to boot and idles (ten booted TCG guests
would saturate the 2-core machine this runs on, and what is soaked is the
agents, not QEMU; a paused VM cannot be moved, so they run).
Their cycles still run the whole path (bitmap backup transaction, stream,
link on the replica, retention merges), with empty deltas.

Every ``--move-every`` seconds one VM is moved with ``ferry vm move`` between
host-1 and host-3 (replication follows it, ``host/replication/handover.py``):
every other move moves the test guest back and forth, the moves between take
the cheap VMs in turn. Every ``--sample-every`` seconds (30) the RSS
(``VmRSS`` of ``/proc/PID/status``) and open file descriptors (entries of
``/proc/PID/fd``) of the three agents are sampled.

At the end the test guest's last console ``seq N`` is compared with the
newest record on its disk (after a clean stop) and on the replica's latest
recovery point (lost records: records the guest reported durable that its
disk does not hold), every replica chain is checked with ``qemu-img check``,
and one JSON summary is printed: samples, per agent RSS/fds first, last,
max and the mean of the first and of the last window (10 min, or a third of
the run if shorter), cycles ok/missed/failed, moves ok/failed, lost records.
``--samples FILE`` also writes every sample as a JSON line while it runs.
``BENCH_VERBOSE=1`` adds progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ferry.client.fleet import Fleet
from ferry.client.settings import load_settings
from ferry.lab import Lab

FREQUENCY = "30s"
PRIMARIES = ("host-1", "host-3")
REPLICA = "host-2"
GUEST_VM = "v01"
VERBOSE = bool(os.environ.get("BENCH_VERBOSE"))


def note(text: str) -> None:
    if VERBOSE:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def ferry(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the ferry CLI; on failure show ferry's own message, not just the exit code."""
    argv = [sys.executable, "-m", "ferry", *args]
    done = subprocess.run(argv, text=True, capture_output=True, env=dict(os.environ))
    if check and done.returncode != 0:
        raise RuntimeError(f"'ferry {' '.join(args)}' exited {done.returncode}: "
                           f"{done.stderr.strip() or done.stdout.strip()}")  # fmt: skip
    return done


def proc_sample(pid: int) -> tuple[int | None, int | None]:
    """(RSS in KiB, open fds) of ``pid``; Nones once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return None, None
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return (int(match.group(1)) if match else None), fds


def last_console_seq(name: str) -> int:
    out = ferry("vm", "console", name).stdout
    seqs = [int(m.group(1)) for m in re.finditer(r"^seq (\d+)\s*$", out, re.MULTILINE)]
    return max(seqs, default=0)


async def move(name: str, to: str) -> tuple[bool, float, str]:
    """One real ``ferry vm move``: (ok, seconds, final line or error)."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ferry", "vm", "move", name, "--to", to, "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    took = time.monotonic() - started
    lines = out.decode().strip().splitlines()
    final = lines[-1] if lines else ""
    ok = proc.returncode == 0 and '"result": "ok"' in final.replace('":"', '": "')
    return ok, took, final if ok else (err.decode().strip() or final)


def window_mean(samples: list[dict[str, Any]], key: str, first: bool, span_s: float) -> float:
    t_end = samples[-1]["t"]
    picked = [s[key] for s in samples if s[key] is not None
              and (s["t"] <= span_s if first else s["t"] >= t_end - span_s)]  # fmt: skip
    return round(statistics.mean(picked), 1) if picked else float("nan")


def summarise(samples: list[dict[str, Any]], agents: dict[str, int]) -> dict[str, Any]:
    span = min(600.0, samples[-1]["t"] / 3) if samples else 0.0
    out: dict[str, Any] = {"window_s": round(span)}
    for host in agents:
        mine = [s for s in samples if s["host"] == host and s["rss_kib"] is not None]
        if not mine:
            continue
        row: dict[str, Any] = {}
        for key in ("rss_kib", "fds"):
            values = [s[key] for s in mine]
            row[key] = {
                "first": values[0], "last": values[-1], "max": max(values),
                "mean_first_window": window_mean(mine, key, True, span),
                "mean_last_window": window_mean(mine, key, False, span),
            }  # fmt: skip
        out[host] = row
    return out


async def soak(args: argparse.Namespace, names: list[str], agents: dict[str, int],
               samples_file: Any) -> dict[str, Any]:  # fmt: skip
    where = dict.fromkeys(names, "host-1")
    samples: list[dict[str, Any]] = []
    moves: list[dict[str, Any]] = []
    moving: asyncio.Task[tuple[bool, float, str]] | None = None
    moving_what: tuple[str, str] = ("", "")
    others = [n for n in names if n != GUEST_VM]
    count = 0
    started = time.monotonic()
    end = started + args.minutes * 60
    next_sample = started
    next_move = started + args.move_every
    while True:
        now = time.monotonic()
        if now >= next_sample:
            t = round(now - started, 1)
            for host, pid in agents.items():
                rss, fds = proc_sample(pid)
                row = {"t": t, "host": host, "pid": pid, "rss_kib": rss, "fds": fds}
                samples.append(row)
                if samples_file is not None:
                    samples_file.write(json.dumps(row) + "\n")
                    samples_file.flush()
            note(", ".join(f"{s['host']} rss {s['rss_kib']} KiB fds {s['fds']}"
                           for s in samples[-len(agents):]))  # fmt: skip
            next_sample += args.sample_every
        if moving is not None and moving.done():
            ok, took, final = moving.result()
            name, to = moving_what
            if ok:
                where[name] = to
            moves.append({"vm": name, "to": to, "ok": ok, "s": round(took, 1),
                          "final": final[:300]})  # fmt: skip
            note(f"move {name} -> {to}: {'ok' if ok else 'FAILED'} in {took:.1f} s: {final[:200]}")
            moving = None
        if now >= end and moving is None:
            break
        if now >= next_move and now < end and moving is None:
            name = GUEST_VM if count % 2 == 0 or not others else others[(count // 2) % len(others)]
            to = PRIMARIES[1] if where[name] == PRIMARIES[0] else PRIMARIES[0]
            moving_what = (name, to)
            moving = asyncio.create_task(move(name, to))
            count += 1
            next_move += args.move_every
        await asyncio.sleep(0.5)
    async with Fleet(load_settings()) as fleet:
        statuses = {n: await fleet.client(where[n]).get(f"/v1/vms/{n}/replication") for n in names}
    cycles = {k: sum(s[k] for s in statuses.values())
              for k in ("success_count", "miss_count", "failure_count")}  # fmt: skip
    return {
        "where": where, "samples": samples, "moves": moves, "cycles": cycles,
        "states": {n: f"{s['state']}/{s['health']}" for n, s in statuses.items()},
    }  # fmt: skip


def check_records(where: dict[str, str]) -> dict[str, Any]:
    """The test guest's console seq against its disk and the replica's latest point."""
    console = last_console_seq(GUEST_VM)
    ferry("vm", "stop", GUEST_VM, "--host", where[GUEST_VM])
    shown = json.loads(ferry("vm", "show", GUEST_VM, "--host", where[GUEST_VM], "--json").stdout)
    disk = json.loads(ferry("guest", "records", shown["disks"][0]["path"], "--json").stdout)
    replica = json.loads(ferry("vm", "show", GUEST_VM, "--host", REPLICA, "--json").stdout)
    point = json.loads(ferry("guest", "records", replica["disks"][0]["path"], "--json").stdout)
    return {
        "console_last_seq": console, "disk_last_seq": disk["last_seq"],
        "disk_corrupt": disk["corrupt"], "replica_last_seq": point["last_seq"],
        "replica_corrupt": point["corrupt"],
        "lost_records": max(0, console - disk["last_seq"]),
    }  # fmt: skip


def check_chains(storage: Path) -> dict[str, int]:
    """``qemu-img check`` of every replica VM's newest file (its whole backing chain)."""
    checked = bad = 0
    for vm_dir in sorted(p for p in storage.iterdir() if p.is_dir()):
        files = sorted(vm_dir.glob("*.qcow2"), key=lambda p: p.stat().st_mtime)
        if not files:
            continue
        checked += 1
        done = subprocess.run(["qemu-img", "check", "-U", str(files[-1])], capture_output=True)
        bad += done.returncode != 0
    return {"chains_checked": checked, "chains_bad": bad}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--vms", type=int, default=10)
    parser.add_argument("--move-every", type=float, default=300.0, help="seconds between moves")
    parser.add_argument("--sample-every", type=float, default=30.0, help="seconds")
    parser.add_argument("--samples", type=Path, help="also write every sample here (JSON lines)")
    args = parser.parse_args()
    if args.vms < 1 or args.minutes <= 0:
        parser.error("--vms must be at least 1 and --minutes positive")
    names = [f"v{i:02d}" for i in range(1, args.vms + 1)]

    with tempfile.TemporaryDirectory(prefix="ferry-soak-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        os.environ["FERRY_HOME"] = str(root / "home")
        lab = Lab(root / "lab")
        samples_file = args.samples.open("w") if args.samples else None
        try:
            note("bringing up 3 lab hosts")
            lab.up(3)
            ferry("replica-server", "enable", "--host", REPLICA, "--storage",
                  str(root / "replicas"), "--allow", "host-1", "--allow", "host-3")  # fmt: skip
            for name in names:
                note(f"creating {name}")
                if name == GUEST_VM:
                    ferry("vm", "create", name, "--host", "host-1", "--guest", "test",
                          "--memory", "128M", "--disk", "64M", "--start")  # fmt: skip
                    ferry("vm", "console", name, "--follow", "--until", "seq 2", "--timeout", "5m")
                else:
                    ferry("vm", "create", name, "--host", "host-1", "--memory", "64M",
                          "--disk", "64M", "--start")  # fmt: skip
            for name in names:
                note(f"enabling replication of {name}")
                ferry("replication", "enable", name, "--replica", REPLICA,
                      "--frequency", FREQUENCY, "--json")  # fmt: skip
            hosts = json.loads(ferry("lab", "status", "--json").stdout)["hosts"]
            agents = {h["name"]: h["pid"] for h in hosts}
            note(f"soaking {args.minutes} min (agents {agents})")
            wall = time.monotonic()
            result = asyncio.run(soak(args, names, agents, samples_file))
            wall_s = time.monotonic() - wall
            records = check_records(result["where"]) if GUEST_VM in names else {}
            chains = check_chains(root / "replicas")
            restarted = [h for h, pid in agents.items()
                         if proc_sample(pid) == (None, None)]  # fmt: skip
        finally:
            if samples_file is not None:
                samples_file.close()
            lab.down()

    moves = result["moves"]
    summary = {
        "vms": len(names), "minutes": args.minutes, "observed_s": round(wall_s),
        "move_every_s": args.move_every, "sample_every_s": args.sample_every,
        "samples": len(result["samples"]), "agents_gone": restarted,
        "agents": summarise(result["samples"], agents),
        "cycles": {"ok": result["cycles"]["success_count"],
                   "missed": result["cycles"]["miss_count"],
                   "failed": result["cycles"]["failure_count"]},
        "moves": {"ok": sum(m["ok"] for m in moves), "failed": sum(not m["ok"] for m in moves),
                  "seconds": [m["s"] for m in moves],
                  "failures": [m for m in moves if not m["ok"]]},
        "records": records, **chains, "states": result["states"],
    }  # fmt: skip
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
