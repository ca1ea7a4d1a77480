"""Live migration benchmark: ``ferry vm move`` against the same migration by hand.

Run: ``.venv/bin/python bench/bench_migration.py [--runs 2]``

For each scenario the same guest (test guest, same memory, same disk) is
moved once by ferry (two lab hosts, the CLI's own code path through the
agents) and once by hand: two QEMUs started from the same command line, the
DESIGN.md QMP sequence driven directly with qemu.qmp, TLS with the same
certificates, the same bandwidth cap. Scenarios:

  a. 1 GiB RAM, idle guest, shared storage (only memory moves)
  b. 1 GiB RAM, the guest dirtying 128 MiB continuously, shared storage
  c. shared-nothing: 4 GiB disk holding 1 GiB of data, 1 GiB RAM

  e. as (b), shared-nothing (a 64 MiB local disk is mirrored first)
  d. convergence: 1 GiB RAM dirtying 256 MiB against a cap (``--converge-cap``,
     8 MiB/s: below the TCG guest's dirty rate; at 32 MiB/s it converged alone):
     ferry's default (auto-converge) and ``--postcopy``; no hand-driven baseline

Prints the median total time and the median guest pause for both and the
ratios ferry / hand. The pause is the honest one on both sides: the source
QEMU's STOP event to the destination QEMU's RESUME event (ferry's
``downtime_ms``; by hand from the same two events), with QEMU's own
``downtime`` next to it, and ferry's per-phase breakdown of the pause
(``pause_phases_ms`` medians); for (c) also the disk copy throughput against
``qemu-img convert`` of the same image in the same run. ``--move-args``
passes extra ``vm move`` options (e.g. ``--downtime-limit 100``). Numbers only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from ferry.core.pause import event_time
from ferry.core.spec import DiskSpec, RunContext, VmSpec, qemu_argv
from ferry.guest.build import dirty_memory_param, ensure_guest
from ferry.lab import Lab

GiB = 1024**3
BANDWIDTH = GiB  # ferry's default per-host cap, used by hand too


def ferry(home: Path, *args: str) -> str:
    env = dict(os.environ, FERRY_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "ferry", *args], check=True, text=True,
                          capture_output=True, env=env).stdout  # fmt: skip


def wait_for(path: Path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text.encode() in path.read_bytes()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{text!r} never appeared in {path}")
        time.sleep(0.1)


def make_data_image(path: Path, size: str, data: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    subprocess.run(["qemu-io", "-c", f"write -P 0x5a 64M {data}", str(path)], check=True,
                   capture_output=True)  # fmt: skip


# -- ferry -------------------------------------------------------------------


MOVE_ARGS: list[str] = []  # --move-args


def by_ferry(home: Path, lab: Lab, name: str, args: list[str], storage: str,
             move_args: tuple[str, ...] = ()) -> dict[str, Any]:  # fmt: skip
    ferry(home, "vm", "create", name, "--host", "host-1", "--guest", "test", *args, "--start")
    vm = json.loads(ferry(home, "vm", "show", name, "--json"))
    log = lab.root / "hosts" / "host-1" / "data" / "vms" / vm["uuid"] / "serial.log"
    wait_for(log, "seq 3")
    lines = ferry(home, "vm", "move", name, "--to", "host-2", "--storage", storage, "--json",
                  *MOVE_ARGS, *move_args)  # fmt: skip
    events = [json.loads(line) for line in lines.splitlines()]
    result: dict[str, Any] = events[-1]
    ferry(home, "vm", "delete", name, "--force")
    return result


# -- by hand -------------------------------------------------------------------


async def qmp(sock: Path) -> QMPClient:
    client = QMPClient("bench")
    for _ in range(100):
        try:
            await client.connect(str(sock))
            return client
        except Exception:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"no QMP at {sock}")


async def by_hand(root: Path, lab: Lab, spec: VmSpec, copy: bool) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="hand-", dir="/tmp"))
    src_tls = lab.root / "hosts" / "host-1" / "tls"
    dst_tls = lab.root / "hosts" / "host-2" / "tls"

    def ctx(side: str, incoming: bool) -> RunContext:
        return RunContext(qemu_binary="qemu-system-x86_64", accelerator="tcg",
                          pidfile=work / f"{side}.pid", qmp_socket=work / f"{side}.qmp",
                          serial_log=work / f"{side}.log", incoming=incoming)  # fmt: skip

    dst_spec = spec
    if copy:
        disks = []
        for index, disk in enumerate(spec.disks):
            path = work / f"dst{index}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(disk.size)],
                           check=True)  # fmt: skip
            disks.append(DiskSpec(path=str(path), size=disk.size))
        dst_spec = spec.model_copy(update={"disks": tuple(disks)})
    pids = []
    try:
        subprocess.run(qemu_argv(spec, ctx("src", False)), check=True)
        pids.append(int((work / "src.pid").read_text()))
        wait_for(work / "src.log", "seq 3")
        started = time.monotonic()  # like ferry's total: includes starting the destination
        subprocess.run(qemu_argv(dst_spec, ctx("dst", True)), check=True)
        pids.append(int((work / "dst.pid").read_text()))
        src, dst = await qmp(work / "src.qmp"), await qmp(work / "dst.qmp")
        dn = "O=ferry,OU=hosts,CN=host-1"
        await dst.execute(
            "object-add",
            {
                "qom-type": "tls-creds-x509",
                "id": "t",
                "endpoint": "server",
                "dir": str(dst_tls),
                "verify-peer": True,
            },
        )
        await dst.execute("object-add", {"qom-type": "authz-simple", "id": "a", "identity": dn})
        caps = [{"capability": "events", "state": True},
                {"capability": "dirty-bitmaps", "state": True}]  # fmt: skip
        await dst.execute("migrate-set-capabilities", {"capabilities": caps})
        if copy:
            await dst.execute(
                "nbd-server-start",
                {
                    "addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "10999"}},
                    "tls-creds": "t",
                    "tls-authz": "a",
                },
            )
            for i in range(len(spec.disks)):
                await dst.execute(
                    "block-export-add",
                    {
                        "type": "nbd",
                        "id": f"e{i}",
                        "node-name": f"disk{i}",
                        "name": f"disk{i}",
                        "writable": True,
                    },
                )
        await dst.execute("migrate-set-parameters", {"tls-creds": "t", "tls-authz": "a"})
        await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:10998"})
        await src.execute(
            "object-add",
            {
                "qom-type": "tls-creds-x509",
                "id": "t",
                "endpoint": "client",
                "dir": str(src_tls),
                "verify-peer": True,
            },
        )
        await src.execute(
            "migrate-set-capabilities",
            {"capabilities": [*caps, {"capability": "pause-before-switchover", "state": True}]},
        )
        await src.execute(
            "migrate-set-parameters",
            {"tls-creds": "t", "tls-hostname": "host-2", "max-bandwidth": BANDWIDTH},
        )
        disk_s = 0.0
        if copy:
            disk_started = time.monotonic()
            for i in range(len(spec.disks)):
                await src.execute(
                    "blockdev-add",
                    {
                        "driver": "nbd",
                        "node-name": f"n{i}",
                        "server": {"type": "inet", "host": "127.0.0.1", "port": "10999"},
                        "export": f"disk{i}",
                        "tls-creds": "t",
                        "tls-hostname": "host-2",
                    },
                )
                await src.execute(
                    "blockdev-mirror",
                    {
                        "job-id": f"m{i}",
                        "device": f"disk{i}",
                        "target": f"n{i}",
                        "sync": "full",
                        "speed": BANDWIDTH,
                    },
                )
            while not all(j.get("ready") for j in await src.execute("query-block-jobs")):
                await asyncio.sleep(0.05)
            disk_s = time.monotonic() - disk_started
        src.events.clear()
        dst.events.clear()
        await src.execute("migrate", {"uri": "tcp:127.0.0.1:10998"})
        while (await src.execute("query-migrate"))["status"] != "pre-switchover":
            await asyncio.sleep(0.01)
        for i in range(len(spec.disks) if copy else 0):
            await src.execute("block-job-cancel", {"device": f"m{i}"})
        while await src.execute("query-block-jobs"):
            await asyncio.sleep(0.01)
        await src.execute("migrate-continue", {"state": "pre-switchover"})
        while (info := await src.execute("query-migrate"))["status"] != "completed":
            await asyncio.sleep(0.01)
        completed = time.monotonic()
        if copy:
            await dst.execute("nbd-server-stop")
        await dst.execute("cont")
        resume_ms = (time.monotonic() - completed) * 1000
        total = time.monotonic() - started
        await asyncio.sleep(0.05)  # the RESUME event comes with cont's reply
        stops = [event_time(dict(m)) for m in src.events.clear() if m["event"] == "STOP"]
        resumes = [event_time(dict(m)) for m in dst.events.clear() if m["event"] == "RESUME"]
        stopped, resumed = (stops or [None])[-1], (resumes or [None])[0]
        pause_ms = (resumed - stopped) * 1000 if stopped and resumed else float("nan")
        await src.disconnect()
        await dst.disconnect()
        return {"total_s": total, "qemu_downtime_ms": info.get("downtime", 0), "disk_s": disk_s,
                "resume_ms": resume_ms, "downtime_ms": pause_ms}  # fmt: skip
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        subprocess.run(["rm", "-rf", str(work)], check=False)


def report(label: str, ferry_runs: list[dict[str, Any]], hand_runs: list[dict[str, Any]]) -> None:
    if os.environ.get("BENCH_VERBOSE"):
        print("  ferry:", ferry_runs)
        print("  hand: ", hand_runs)
    f_total = statistics.median(r["total_s"] for r in ferry_runs)
    h_total = statistics.median(r["total_s"] for r in hand_runs)
    # The guest's pause (STOP -> RESUME events) on both sides; QEMU's own figure beside it.
    f_down = statistics.median(r["downtime_ms"] for r in ferry_runs)
    h_down = statistics.median(r["downtime_ms"] for r in hand_runs)
    ratio = (f_down / h_down) if h_down else float("nan")
    f_qemu = statistics.median(r["qemu_downtime_ms"] for r in ferry_runs)
    h_qemu = statistics.median(r["qemu_downtime_ms"] for r in hand_runs)
    print(f"{label} ({len(ferry_runs)} moves each): total ferry {f_total:.2f}s / hand "
          f"{h_total:.2f}s = {f_total / h_total:.2f}x; pause (STOP->RESUME) median ferry "
          f"{f_down:.0f}ms / hand {h_down:.0f}ms = {ratio:.2f}x"
          f" (all ferry: {sorted(r['downtime_ms'] for r in ferry_runs)}); QEMU's downtime "
          f"ferry {f_qemu:.0f}ms / hand {h_qemu:.0f}ms")  # fmt: skip
    phases(ferry_runs)


def phases(ferry_runs: list[dict[str, Any]]) -> None:
    """Median of each phase of ferry's pause (pause_phases_ms)."""
    names = list(ferry_runs[0].get("pause_phases_ms") or {})
    medians = {n: statistics.median(r["pause_phases_ms"].get(n, 0) for r in ferry_runs)
               for n in names}  # fmt: skip
    print("   pause phases (median ms): " + ", ".join(f"{n} {v:.0f}" for n, v in medians.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--only", choices=["a", "b", "c", "d", "e"], default=None)
    parser.add_argument("--move-args", default="", help="extra vm move options, one string")
    parser.add_argument("--converge-cap", default="8M", help="(d) the bandwidth cap")
    args = parser.parse_args()
    MOVE_ARGS.extend(args.move_args.split())
    with tempfile.TemporaryDirectory(prefix="ferry-bench-mig-") as tmp:
        root = Path(tmp)
        home = root / "home"
        os.environ["FERRY_HOME"] = str(home)
        cache = Path(os.environ.get("FERRY_GUEST_CACHE") or root / "guest")
        os.environ["FERRY_GUEST_CACHE"] = str(cache)
        guest = ensure_guest(cache)
        lab = Lab(root / "lab")
        lab.up(2)
        try:
            shared = lab.shared_dir
            scenarios = {
                "a": ("a. 1 GiB RAM idle, shared", ["--memory", "1G", "--disk", "64M",
                      "--volume", "shared"], "shared", guest.append),
                "b": ("b. 1 GiB RAM dirtying 128 MiB, shared", ["--memory", "1G", "--disk",
                      "64M", "--volume", "shared", "--append", dirty_memory_param(128 * 1024**2)],
                      "shared", f"{guest.append} {dirty_memory_param(128 * 1024**2)}"),
                "e": ("e. 1 GiB RAM dirtying 128 MiB, copy (64 MiB disk)", ["--memory", "1G",
                      "--disk", "64M", "--append", dirty_memory_param(128 * 1024**2)],
                      "copy", f"{guest.append} {dirty_memory_param(128 * 1024**2)}"),
            }  # fmt: skip
            for key, (label, create, storage, append) in scenarios.items():
                if args.only not in (None, key):
                    continue
                ferry_runs, hand_runs = [], []
                for run in range(args.runs):
                    ferry_runs.append(by_ferry(home, lab, f"bench-{key}{run}", create, storage))
                    disk = (shared if storage == "shared" else root) / f"hand-{key}{run}.qcow2"
                    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"],
                                   check=True)  # fmt: skip
                    spec = VmSpec(name=f"hand-{key}{run}", config_version=3, memory=GiB,
                                  disks=(DiskSpec(path=str(disk), size=64 * 1024**2,
                                                  direct=storage == "shared"),),
                                  kernel=str(guest.kernel), initrd=str(guest.initrd),
                                  append=append)  # fmt: skip
                    hand_runs.append(asyncio.run(by_hand(root, lab, spec,
                                                         copy=storage == "copy")))  # fmt: skip
                    disk.unlink()
                report(label, ferry_runs, hand_runs)

            if args.only in (None, "c"):
                image = lab.images_dir / "data.qcow2"
                make_data_image(image, "4G", "1G")
                started = time.monotonic()
                subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(image),
                                str(root / "convert.qcow2")], check=True)  # fmt: skip
                convert_s = time.monotonic() - started
                (root / "convert.qcow2").unlink()
                ferry_runs, hand_runs = [], []
                for run in range(args.runs):
                    ferry_runs.append(
                        by_ferry(
                            home,
                            lab,
                            f"bench-c{run}",
                            ["--memory", "1G", "--image", str(image)],
                            "copy",
                        )
                    )
                    disk = root / f"hand-c{run}.qcow2"
                    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(image), str(disk)],
                                   check=True)  # fmt: skip
                    spec = VmSpec(name=f"hand-c{run}", config_version=3, memory=GiB,
                                  disks=(DiskSpec(path=str(disk), size=4 * GiB),),
                                  kernel=str(guest.kernel), initrd=str(guest.initrd),
                                  append=guest.append)  # fmt: skip
                    hand_runs.append(asyncio.run(by_hand(root, lab, spec, copy=True)))
                    disk.unlink()
                report("c. shared-nothing, 4 GiB disk with 1 GiB data, 1 GiB RAM",
                       ferry_runs, hand_runs)  # fmt: skip
                hand_disk = statistics.median(r["disk_s"] for r in hand_runs)
                ferry_disk = statistics.median(r["disk_copy_s"] for r in ferry_runs)
                print(
                    f"   disk copy: ferry {GiB / ferry_disk / 1024**2:.0f} MiB/s of data "
                    f"({ferry_disk:.2f}s, ratio ferry/convert time {ferry_disk / convert_s:.2f});"
                )
                print(f"   disk copy: mirror by hand {GiB / hand_disk / 1024**2:.0f} MiB/s of data "
                      f"({hand_disk:.2f}s); qemu-img convert {GiB / convert_s / 1024**2:.0f} MiB/s "
                      f"({convert_s:.2f}s); ratio convert/mirror time "
                      f"{convert_s / hand_disk:.2f}")  # fmt: skip
            if args.only == "d":  # not in the default set: it moves slowly on purpose
                converge(home, lab, args.runs, args.converge_cap)
        finally:
            lab.down()


def converge(home: Path, lab: Lab, runs: int, cap: str) -> None:
    """d. a guest dirtying memory faster than a capped link: auto-converge, then --postcopy."""
    create = ["--memory", "1G", "--disk", "64M", "--volume", "shared", "--append",
              dirty_memory_param(256 * 1024**2)]  # fmt: skip
    for label, extra in (("auto-converge", ()), ("postcopy", ("--postcopy",))):
        results = [by_ferry(home, lab, f"bench-d{label[:4]}{run}", create, "shared",
                            ("--max-bandwidth", cap, *extra)) for run in range(runs)]  # fmt: skip
        totals = sorted(r["total_s"] for r in results)
        downs = sorted(r["downtime_ms"] for r in results)
        print(f"d. 1 GiB dirtying 256 MiB at a {cap}/s cap, {label}: all moved; total "
              f"{statistics.median(totals):.1f}s {totals}, pause (STOP->RESUME) median "
              f"{statistics.median(downs):.0f}ms {downs}, postcopy "
              f"{[r.get('postcopy') for r in results]}")  # fmt: skip
        phases(results)


if __name__ == "__main__":
    main()
