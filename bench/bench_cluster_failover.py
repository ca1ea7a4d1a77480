"""HA failover benchmark: a node lost whole -> its guest's ``up`` line on another node.

Run: ``.venv/bin/python bench/bench_cluster_failover.py [--runs 5] [--ttl 4]``

A lab of 3 hosts in cluster ``c1`` (one etcd, volume ``csv1``, lease TTL
``--ttl``). Each run creates a test guest on one node (the leader's node in odd
runs, so the election is part of the path; another node in even runs), lets it
count, then SIGKILLs that node's agent, QEMU and fence guard at once, and
times the way back in phases:

  lease expiry   kill -> etcd deleted the node's ``alive`` key (its lease ran out)
  decision       -> the leader's ``vm-restart`` event (a new election first, if
                    the leader was on the lost node; then the owner's
                    compare-and-swap)
  placement      -> the new QEMU started on the chosen node (its reconciler)
  boot           -> the guest printed ``ferry-guest up`` there

The baseline is the lease TTL: no design that waits for etcd to expire the
lease (so that no clock but etcd's is trusted) can restart sooner. Prints each
run, the medians, and the ratio total / TTL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ferry.adapters import qemu
from ferry.adapters.etcd import open_store
from ferry.client.fleet import Fleet
from ferry.client.settings import load_settings
from ferry.core.cluster.keys import ClusterKeys
from ferry.host.cluster.guard import GuardPaths
from ferry.host.config import load_host_config
from ferry.lab import Lab

UP = re.compile(r"ferry-guest up last-seq=(\d+)\r?\n")
SEQ = re.compile(r"^seq (\d+)", re.MULTILINE)
CLUSTER = "c1"
PHASES = ("lease expiry", "decision", "placement", "boot")


def ferry(home: Path, *args: str) -> Any:
    """Run ``ferry ARGS`` (``--json`` added for the read commands ``show``/``events``)."""
    env = dict(os.environ, FERRY_HOME=str(home))
    reads = args[:1] == ("cluster",) and args[1:2] in (("show",), ("events",))
    argv = [sys.executable, "-m", "ferry", *args, *(["--json"] if reads else [])]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"ferry {' '.join(args)} failed: {done.stderr.strip()}")
    return json.loads(done.stdout) if reads else None


def start_time(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    ticks = int(stat.rpartition(")")[2].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


async def console(home: Path, name: str) -> tuple[str, str]:
    """(host, console text) of VM ``name``, wherever it runs."""
    async with Fleet(load_settings(home)) as fleet:
        where, _ = await fleet.locate(name, None)
        chunk = await fleet.client(where).get(f"/v1/vms/{name}/console", offset="0")
        return where, str(chunk["text"])


async def vm_show(home: Path, name: str) -> dict[str, Any]:
    async with Fleet(load_settings(home)) as fleet:
        where, _ = await fleet.locate(name, None)
        shown: dict[str, Any] = await fleet.client(where).get(f"/v1/vms/{name}")
        return shown


async def one_run(lab: Lab, home: Path, run: int, ttl: int) -> dict[str, float]:
    shown = ferry(home, "cluster", "show", CLUSTER)
    leader = shown["leader"]
    others = sorted(n["name"] for n in shown["nodes"] if n["name"] != leader)
    victim = leader if run % 2 == 1 else others[0]
    name = f"fo{run}"
    ferry(home, "vm", "create", name, "--cluster", CLUSTER, "--volume", "csv1", "--host", victim,
          "--guest", "test", "--memory", "128M", "--disk", "32M", "--start")  # fmt: skip
    while len(SEQ.findall((await console(home, name))[1])) < 3:
        await asyncio.sleep(0.3)
    vm = await vm_show(home, name)
    index = int(victim.rsplit("-", 1)[1])
    host = lab.host(index)
    config = load_host_config(host.config_path)
    guard = GuardPaths.of_host(config.name, config.data_dir, config.runtime_dir)
    cluster = json.loads((config.data_dir / "cluster.json").read_text())
    store = open_store(cluster["etcd"], config.tls_dir)
    keys = ClusterKeys(CLUSTER)
    try:
        t_kill = time.time()
        for pid in (host.pid(), vm["pid"], guard.pid()):
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
        while await store.get(keys.alive(victim)) is not None:
            await asyncio.sleep(0.02)
        t_expired = time.time()
        t_decided: float | None = None
        t_started: float | None = None
        while True:
            if t_decided is None:
                events = [
                    e
                    for e in ferry(home, "cluster", "events", CLUSTER)
                    if e["kind"] == "vm-restart" and e["vm"] == name and e["at"] >= t_kill
                ]
                if events:
                    t_decided = float(events[0]["at"])
            with contextlib.suppress(Exception):
                where, text = await console(home, name)
                if where != victim and t_started is None:
                    pids = _pids_for(vm["uuid"])
                    if pids:
                        t_started = start_time(pids[0])
                if where != victim and UP.search(text):
                    t_up = time.time()
                    break
            await asyncio.sleep(0.1)
        assert t_decided is not None and t_started is not None
    finally:
        await store.close()
    await asyncio.to_thread(lab.up, 3)  # the lost node's agent again (from cluster.json)
    ferry(home, "vm", "kill", name)
    ferry(home, "vm", "delete", name, "--force")
    await wait_all_up(home)
    return {
        "lease expiry": t_expired - t_kill,
        "decision": t_decided - t_expired,
        "placement": t_started - t_decided,
        "boot": t_up - t_started,
        "total": t_up - t_kill,
        "leader lost": float(victim == leader),
    }


def _pids_for(uuid: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and qemu.process_matches(int(entry.name), uuid):
            found.append(int(entry.name))
    return found


async def wait_all_up(home: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        nodes = ferry(home, "cluster", "show", CLUSTER)["nodes"]
        if all(n["state"] == "up" for n in nodes):
            return
        await asyncio.sleep(0.5)
    raise SystemExit(f"the cluster's nodes did not all come back up: {nodes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ttl", type=int, default=4, help="the lease TTL in seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ferry-bench-ha-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        home = root / "home"
        os.environ["FERRY_HOME"] = str(home)
        lab = Lab(root / "lab")
        results = []
        try:
            lab.up(3, clusters={CLUSTER: ["host-1", "host-2", "host-3"]}, lease_ttl_s=args.ttl)
            asyncio.run(wait_all_up(home))
            for run in range(1, args.runs + 1):
                result = asyncio.run(one_run(lab, home, run, args.ttl))
                results.append(result)
                print(f"run {run} ({'leader' if result['leader lost'] else 'member'} lost): "
                      + "  ".join(f"{p} {result[p]:5.2f}s" for p in PHASES)
                      + f"  total {result['total']:5.2f}s", flush=True)  # fmt: skip
        finally:
            lab.down()
    print(f"\nmedians over {len(results)} runs (lease TTL {args.ttl} s):")
    for phase in (*PHASES, "total"):
        print(f"  {phase:>12}: {statistics.median(r[phase] for r in results):6.2f} s")
    total = statistics.median(r["total"] for r in results)
    started = statistics.median(r["total"] - r["boot"] for r in results)
    print(f"  ratio total / TTL baseline: {total / args.ttl:.2f}x")
    # The guest's boot is its own (TCG here, and shared CPUs): without it.
    print(f"  ratio kill -> new QEMU started / TTL baseline: {started / args.ttl:.2f}x")
    print(f"  load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
