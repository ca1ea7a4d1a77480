"""Copy Cluster Roles' downtime per VM, shared and copied storage, next to doing it by hand.

A throw-away lab of four hosts: cluster c1 (host-1, host-2) and c2 (host-3,
host-4). Volume ``shared`` is one directory both clusters have (nothing is
copied); volume ``csv1`` is each cluster's own directory (``--run`` copies
the disks: a full copy while the VMs run, then the stop and only the
changes). ``--vms`` test guests on each volume, each with a disk of
``--disk`` holding ``--data`` written before it boots, all on host-1 and
host-2 of c1. Then ``copy-roles --test`` and ``--run`` of each volume into
c2; each VM's ``downtime_s`` (stop asked -> running in c2) and, copied, its
``copied_bytes``.

The baseline, in the same run and of the same size: a plain VM on host-1 with
the same disk and data, ``vm stop``, ``qemu-img convert`` of its disk (the
copy an admin would make), ``vm start``; its downtime is stop asked ->
running again. Prints every figure, the medians and the ratios copy-roles /
by hand.

    .venv/bin/python bench/bench_copy_roles.py --vms 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench_lab import bench_lab, ferry


def create(home: Path, name: str, host: str, disk: str, data: str, *cluster: str) -> None:
    ferry(home, "vm", "create", name, "--host", host, "--guest", "test", "--memory", "128M",
          "--disk", disk, *cluster)  # fmt: skip
    path = json.loads(ferry(home, "vm", "show", name, "--json"))["disks"][0]["path"]
    # Past the records' slots at the front of the disk: data the full copy carries.
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 64M {data}", path],
                   check=True, capture_output=True)  # fmt: skip
    ferry(home, "vm", "start", name, "--host", host)


def wait_booted(home: Path, name: str, timeout: float = 300) -> None:
    """Until the guest writes records (a stop before it booted is forced: not the case here)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ferry(home, "vm", "console", name).count("seq ") >= 2:
            return
        time.sleep(1)
    raise SystemExit(f"VM {name} did not boot in {timeout:.0f} s")


def by_hand(home: Path, name: str, scratch: Path) -> dict[str, float]:
    """Stop, copy the disk with qemu-img convert, start: the downtime and the copy's part."""
    disk = Path(json.loads(ferry(home, "vm", "show", name, "--json"))["disks"][0]["path"])
    target = scratch / f"{name}-copy.qcow2"
    stopped = time.monotonic()
    ferry(home, "vm", "stop", name)
    began = time.monotonic()
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", str(disk), str(target)],
                   check=True)  # fmt: skip
    copied = time.monotonic()
    ferry(home, "vm", "start", name)
    done = time.monotonic()
    target.unlink()
    # stop and start include the CLI's own start-up (a Python process each): an admin's
    # by-hand figure, but more than the agent's; the copy alone is the floor of any
    # stop-copy-start.
    return {"downtime_s": round(done - stopped, 3), "stop_s": round(began - stopped, 3),
            "copy_s": round(copied - began, 3), "start_s": round(done - copied, 3)}  # fmt: skip


def copy_roles(home: Path, volume: str) -> dict[str, Any]:
    base = ("cluster", "copy-roles", "--from", "c1", "--to", "c2", "--volume", volume, "--json")
    ferry(home, *base, "--test")
    result: dict[str, Any] = json.loads(ferry(home, *base, "--run"))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=2, help="VMs on each volume.")
    parser.add_argument("--disk", default="1G")
    parser.add_argument("--data", default="512M", help="Written into each disk first.")
    args = parser.parse_args()
    clusters = {"c1": ["host-1", "host-2"], "c2": ["host-3", "host-4"]}
    with bench_lab("ferry-bench-copy-roles-", 4, clusters=clusters, lease_ttl_s=4,
                   host_settings={"image_locking": False}) as (home, lab):  # fmt: skip
        shared = lab.root / "shared-volume"
        shared.mkdir()
        for cluster in ("c1", "c2"):
            ferry(home, "cluster", "volume", "add", "shared", str(shared), "--cluster", cluster)
        for i in range(args.vms):
            host = f"host-{1 + i % 2}"
            for volume in ("shared", "csv1"):
                create(home, f"{volume}-{i}", host, args.disk, args.data, "--cluster", "c1",
                       "--volume", volume)  # fmt: skip
        create(home, "plain", "host-1", args.disk, args.data)
        names = [f"{v}-{i}" for i in range(args.vms) for v in ("shared", "csv1")]
        for name in [*names, "plain"]:
            wait_booted(home, name)
        hand = []
        for _ in range(args.vms):
            hand.append(by_hand(home, "plain", lab.root))
            wait_booted(home, "plain")
        runs = {volume: copy_roles(home, volume) for volume in ("shared", "csv1")}
        for volume, report in runs.items():
            for row in report["vms"]:
                copied = row.get("copied_bytes") or {}
                extra = (f", full copy {copied['full'] / 2**20:.0f} MiB in {copied['full_s']} s, "
                         f"final delta {copied['final'] / 2**20:.2f} MiB in "
                         f"{copied['final_s']} s" if copied else "")  # fmt: skip
                print(f"copy-roles {volume:6} {row['name']}: downtime {row['downtime_s']} s"
                      f"{extra}")  # fmt: skip
        for h in hand:
            print(f"by hand (stop, qemu-img convert, start): downtime {h['downtime_s']} s "
                  f"(stop {h['stop_s']}, copy {h['copy_s']}, start {h['start_s']} s)")  # fmt: skip
        base = round(statistics.median(h["downtime_s"] for h in hand), 3)
        floor = round(statistics.median(h["copy_s"] for h in hand), 3)
        for volume, report in runs.items():
            down = round(statistics.median(r["downtime_s"] for r in report["vms"]), 3)
            print(f"median downtime {volume}: {down} s vs by hand {base} s ({down / base:.2f}x), "
                  f"vs the copy alone {floor} s ({down / floor:.2f}x)")  # fmt: skip
        full = round(statistics.median(r["copied_bytes"]["full_s"] for r in runs["csv1"]["vms"]), 3)
        print(f"median full copy (VMs running) {full} s; load: "
              f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")  # fmt: skip


if __name__ == "__main__":
    main()
