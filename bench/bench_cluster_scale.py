"""``vm list`` and ``cluster show`` with 1000 clustered VM roles, against an empty cluster.

Run: ``.venv/bin/python bench/bench_cluster_scale.py [--roles 1000] [--calls 20]``

One lab of 3 hosts in cluster ``c1`` (one etcd of the lab's CA, made with the
cluster commands as an admin would; volume ``csv1``). First the empty
cluster is timed; then ``--roles`` VM roles are written straight into etcd as
off VMs (config, owner spread over the three nodes, want ``off``, the unique
name; 100 puts per transaction), the bench waits until every node's
reconciler has registered the VMs it owns (so ``vm list`` lists all of them,
each on its owner), and times again, in the same run:

  vm list (api)     ``GET /v1/vms`` on every host at once, what ``ferry vm list`` asks
  cluster show (api) ``GET /v1/clusters/c1`` on one host (one range read of the prefix)
  vm list (cli)     ``ferry vm list --json`` as a process (Python start-up included)
  cluster show (cli) ``ferry cluster show c1 --json`` as a process

It prints the median and p95 of each, empty and full, the ratio, and how long
the reconcilers took to register the roles. The roles are removed before the
lab goes down.
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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ferry.adapters.etcd import open_store
from ferry.adapters.etcd_server import EtcdServer
from ferry.client.fleet import Fleet
from ferry.client.settings import load_settings
from ferry.core.cluster.keys import ClusterKeys
from ferry.core.cluster.roles import Owner, Priority, VmRole, Want, encode_role
from ferry.core.cluster.store import ClusterStore, Delete, Op, Put
from ferry.core.spec import VmSpec
from ferry.lab import Lab

CLUSTER = "c1"
NODES = ("host-1", "host-2", "host-3")
KEYS = ClusterKeys(CLUSTER)
BATCH = 100  # puts per transaction (etcd allows 128 operations by default)
PREFIX = "scale"  # the bench's VM names


def ferry(home: Path, *args: str) -> str:
    env = dict(os.environ, FERRY_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "ferry", *args], check=True,
                          capture_output=True, text=True, env=env).stdout  # fmt: skip


def make_cluster(lab: Lab, etcd: EtcdServer, home: Path) -> None:
    lab.up(3)
    etcd.start()
    ferry(home, "cluster", "create", CLUSTER, "--etcd", etcd.url, "--host", NODES[0])
    for node in NODES[1:]:
        ferry(home, "cluster", "join", CLUSTER, "--host", node)
    volume = lab.root / "clusters" / CLUSTER / "csv1"
    volume.mkdir(parents=True)
    ferry(home, "cluster", "volume", "add", "csv1", str(volume), "--cluster", CLUSTER)


def store_of(lab: Lab) -> ClusterStore:
    host = lab.host(1)
    cluster = json.loads((host.data_dir / "cluster.json").read_text())
    return open_store(cluster["etcd"], host.dir / "tls")


async def in_batches(store: ClusterStore, ops: list[Op]) -> None:
    for start in range(0, len(ops), BATCH):
        await store.txn([], ops[start : start + BATCH])


async def write_roles(lab: Lab, count: int) -> list[str]:
    store = store_of(lab)
    try:
        ops: list[Op] = []
        uuids = []
        for i in range(count):
            spec = VmSpec(name=f"{PREFIX}{i:04d}", config_version=1, memory=64 * 1024**2)
            role = VmRole(spec=spec, priority=Priority.LOW, volume="csv1")
            ops += [Put(KEYS.vm_config(spec.uuid), encode_role(role)),
                    Put(KEYS.vm_owner(spec.uuid), Owner.settled(NODES[i % 3]).encode()),
                    Put(KEYS.vm_want(spec.uuid), Want.OFF.value.encode()),
                    Put(KEYS.name(spec.name), spec.uuid.encode())]  # fmt: skip
            uuids.append(spec.uuid)
        await in_batches(store, ops)
        return uuids
    finally:
        await store.close()


async def remove_roles(lab: Lab, uuids: list[str]) -> None:
    store = store_of(lab)
    try:
        ops: list[Op] = []
        for i, uuid in enumerate(uuids):
            ops += [Delete(f"{KEYS.vms}{uuid}/", prefix=True),
                    Delete(KEYS.name(f"{PREFIX}{i:04d}"))]  # fmt: skip
        await in_batches(store, ops)
    finally:
        await store.close()


async def listed(home: Path) -> int:
    async with Fleet(load_settings(home)) as fleet:
        answers = await fleet.each("/v1/vms")
    return sum(1 for vms in answers.values() if isinstance(vms, list)
               for vm in vms if vm["name"].startswith(PREFIX))  # fmt: skip


async def time_api(home: Path, calls: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"vm list (api)": [], "cluster show (api)": []}

    async def timed(what: str, call: Callable[[], Awaitable[Any]]) -> None:
        start = time.perf_counter()
        await call()
        times[what].append(time.perf_counter() - start)

    async with Fleet(load_settings(home)) as fleet:
        for _ in range(calls):
            await timed("vm list (api)", lambda: fleet.each("/v1/vms"))
            await timed("cluster show (api)",
                        lambda: fleet.client("host-1").get(f"/v1/clusters/{CLUSTER}"))  # fmt: skip
    return times


def time_cli(home: Path, runs: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"vm list (cli)": [], "cluster show (cli)": []}
    commands = {"vm list (cli)": ["vm", "list", "--json"],
                "cluster show (cli)": ["cluster", "show", CLUSTER, "--json"]}  # fmt: skip
    for _ in range(runs):
        for what, args in commands.items():
            start = time.perf_counter()
            ferry(home, *args)
            times[what].append(time.perf_counter() - start)
    return times


def measure(home: Path, calls: int, cli_runs: int) -> dict[str, list[float]]:
    times = asyncio.run(time_api(home, calls))
    times.update(time_cli(home, cli_runs))
    return times


def summary(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    return statistics.median(values) * 1000, p95 * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--roles", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--cli-runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ferry-bench-scale-") as tmp:
        root = Path(tmp)
        home = root / "home"
        os.environ["FERRY_HOME"] = str(home)
        lab = Lab(root / "lab")
        etcd = EtcdServer(root / "etcd", lab.ca_dir)
        try:
            make_cluster(lab, etcd, home)
            empty = measure(home, args.calls, args.cli_runs)
            start = time.perf_counter()
            uuids = asyncio.run(write_roles(lab, args.roles))
            written = time.perf_counter() - start
            deadline = time.monotonic() + 300
            while asyncio.run(listed(home)) < args.roles:
                if time.monotonic() > deadline:
                    raise SystemExit("the reconcilers did not register every role in 300 s")
                time.sleep(0.5)
            registered = time.perf_counter() - start
            full = measure(home, args.calls, args.cli_runs)
            asyncio.run(remove_roles(lab, uuids))
        finally:
            lab.down()
            etcd.stop()
    print(f"{args.roles} clustered VM roles (off) in etcd; 3 nodes; {args.calls} API calls, "
          f"{args.cli_runs} CLI runs each")  # fmt: skip
    print(f"written in {written:.1f} s; every node's reconciler had registered its VMs "
          f"{registered:.1f} s after the first write")  # fmt: skip
    print(f"{'':20} {'empty median/p95 ms':>20} {'full median/p95 ms':>20} {'ratio':>6}")
    for what in empty:
        e_med, e_p95 = summary(empty[what])
        f_med, f_p95 = summary(full[what])
        print(f"{what:20} {e_med:9.0f} / {e_p95:<8.0f} {f_med:9.0f} / {f_p95:<8.0f} "
              f"{f_med / e_med:6.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
