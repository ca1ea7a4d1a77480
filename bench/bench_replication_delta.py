"""Replication cycle benchmark: one 4 GiB disk, 64 MiB changed per cycle, ferry vs rsync --inplace.

Run: ``.venv/bin/python bench/bench_replication_delta.py [--cycles 3] [--https]``

``--https`` (issue 18 item 4) measures the whole cycle through the agents
instead: a two-host lab (host.toml ``test_monitor``), a test guest with a
4 GiB disk holding 1 GiB, replicated to host-2. Per cycle 64 MiB of fresh
random data go into the running disk over the VM's test monitor (HMP
``qemu-io``), then, for the *same* change: the bare incremental backup from
a bitmap of the benchmark's own (``bench-bare``, the floor), and
``replication sync`` (cut, compress, send over HTTPS, verify, link). Printed:
seconds of each, their ratio (goal <= 2), the cycle's phases as the agent
measured them, and bytes sent / bytes changed (goal <= 1.05). At the end the
VM is paused, synced once more and the replica's latest point compared with
the primary's disk (``qemu-img compare``).

Without it:

A running test guest (TCG) on a 4 GiB qcow2 holding 1 GiB of random data.
Before each cycle 64 scattered MiB of fresh random data are written into the
running disk (QEMU's own ``qemu-io`` over HMP). Then, in the same run:

- ferry's data path: ``ChangedBlockTracker.delta`` (incremental backup of the
  bitmap), the delta stream (``encode_point``, zstd), and the replica's
  ``PointReceiver`` (verify, ``qemu-img check``, ``rebase -u``, fsync, link)
  into a chain on the same machine. The guest keeps running.
- the baseline: ``rsync --inplace --no-whole-file`` of the whole image file
  onto the previous cycle's copy (the guest paused so the file holds still).

Printed per side: bytes sent, seconds, CPU seconds (this process and its
children, plus QEMU's own for ferry's backup), and ratios ferry / rsync. The
HTTPS hop between agents is left out on both sides (rsync runs locally too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

from ferry.adapters import qemu
from ferry.adapters.cbt import ChangedBlockTracker
from ferry.adapters.point_transfer import PointReceiver, encode_point, receive_point
from ferry.core.spec import DiskSpec, RunContext, VmSpec, qemu_argv
from ferry.guest.build import ensure_guest

sys.path.insert(0, str(Path(__file__).parent))

from bench_replication_fleet import ferry

MiB = 1024**2
GiB = 1024**3
DISK = 4 * GiB


def cpu_self_children() -> float:
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_disk(path: Path, scratch: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(DISK)], check=True)
    chunk = scratch / "random-chunk"
    chunk.write_bytes(os.urandom(64 * MiB))
    # 1 GiB of random data in 16 runs of 64 MiB, spread over the disk.
    cmds = []
    for i in range(16):
        cmds += ["-c", f"write -s {chunk} {(i * 256 + 64) * MiB} {64 * MiB}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(path)], check=True,
                   capture_output=True)  # fmt: skip
    chunk.unlink()


async def scribble(channel: qemu.QmpChannel, scratch: Path, cycle: int) -> None:
    """64 scattered MiB of new random data (no two MiB alike) into the running disk."""
    for i in range(64):
        source = scratch / f"scribble-{cycle}-{i}"
        source.write_bytes(os.urandom(MiB))
        offset = ((i * 61 + cycle * 7) % 4000) * MiB
        line = f'qemu-io -d vblk0/virtio-backend "write -s {source} {offset} 1M"'
        await channel.execute("human-monitor-command", {"command-line": line})
        source.unlink()
    await channel.execute("human-monitor-command",
                          {"command-line": 'qemu-io -d vblk0/virtio-backend "flush"'})  # fmt: skip


Row = tuple[int, float, float]  # bytes sent, seconds, CPU seconds


async def ferry_cycle(tracker: ChangedBlockTracker, work: Path, replica: Path, uuid: str,
                      point: int, previous: Path, qemu_pid: int) -> tuple[Row, Path]:  # fmt: skip
    cpu0, qcpu0, t0 = cpu_self_children(), cpu_of(qemu_pid), time.monotonic()
    (delta,) = await tracker.delta(work, f"p{point}")
    target = replica / f"p{point}-disk0.qcow2"
    receiver = PointReceiver([target], vm_uuid=uuidlib.UUID(uuid), point_id=point)
    sent = [0]

    async def stream():  # type: ignore[no-untyped-def]
        frames = encode_point([delta], vm_uuid=uuidlib.UUID(uuid), point_id=point)
        done = object()
        while (frame := await asyncio.to_thread(next, frames, done)) is not done:
            assert isinstance(frame, bytes)
            sent[0] += len(frame)
            yield frame

    await receive_point(stream(), receiver, [previous])
    seconds = time.monotonic() - t0
    cpu = cpu_self_children() - cpu0 + cpu_of(qemu_pid) - qcpu0
    delta.unlink()
    return (sent[0], seconds, cpu), target


def rsync_cycle(disk: Path, copy: Path) -> tuple[int, float, float]:
    cpu0, t0 = cpu_self_children(), time.monotonic()
    argv = ["rsync", "--inplace", "--no-whole-file", "--stats", str(disk), str(copy)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    seconds = time.monotonic() - t0
    literal = int(re.search(r"Literal data: ([\d,]+)", out).group(1).replace(",", ""))  # type: ignore[union-attr]
    return literal, seconds, cpu_self_children() - cpu0


async def run(cycles: int, root: Path, verbose: bool) -> None:
    guest = ensure_guest(Path(os.environ.get("FERRY_GUEST_CACHE", root / "guest")))
    disk, work, replica = root / "disk.qcow2", root / "work", root / "replica"
    work.mkdir()
    replica.mkdir()
    make_disk(disk, root)
    spec = VmSpec(name="bench", config_version=3, memory=256 * MiB,
                  disks=(DiskSpec(path=str(disk), size=DISK),), kernel=str(guest.kernel),
                  initrd=str(guest.initrd), append=guest.append)  # fmt: skip
    ctx = RunContext(qemu_binary="qemu-system-x86_64", accelerator="tcg",
                     pidfile=root / "qemu.pid", qmp_socket=root / "qmp.sock",
                     serial_log=root / "serial.log")  # fmt: skip
    pid = await qemu.launch(qemu_argv(spec, ctx), pidfile=ctx.pidfile, uuid=spec.uuid)
    channel = qemu.QmpChannel(ctx.qmp_socket, name="bench")
    ferry_rows: list[tuple[int, float, float]] = []
    rsync_rows: list[tuple[int, float, float]] = []
    try:
        await channel.connect()
        await asyncio.sleep(5)  # let the guest boot and start writing records
        tracker = ChangedBlockTracker(channel, spec.disks, vm="bench")
        await channel.execute("stop")
        (base,) = await tracker.full(work, "base")
        shutil.move(base, replica / "base-disk0.qcow2")
        previous = replica / "base-disk0.qcow2"
        rsync_copy = root / "rsync-copy.qcow2"
        subprocess.run(["cp", "--sparse=always", str(disk), str(rsync_copy)], check=True)
        await channel.execute("cont")
        for cycle in range(1, cycles + 1):
            await scribble(channel, root, cycle)
            # Paused for both sides so the results can be compared byte for
            # byte; ferry's cycle does not need it (the backup is point-in-time).
            await channel.execute("stop")
            row, previous = await ferry_cycle(tracker, work, replica, spec.uuid, cycle,
                                              previous, pid)  # fmt: skip
            ferry_rows.append(row)
            rsync_rows.append(rsync_cycle(disk, rsync_copy))
            same = subprocess.run(["qemu-img", "compare", "-U", str(previous), str(disk)],
                                  capture_output=True).returncode == 0  # fmt: skip
            await channel.execute("cont")
            if verbose:
                print(f"cycle {cycle}: ferry {ferry_rows[-1]}, rsync {rsync_rows[-1]}, "
                      f"replica chain == disk: {same}")  # fmt: skip
            assert same, "the replica chain differs from the disk"
    finally:
        await channel.close()
        await qemu.kill_process(pid, spec.uuid)

    def med(rows: list[tuple[int, float, float]], i: int) -> float:
        return statistics.median(r[i] for r in rows)

    print(f"4 GiB disk, 1 GiB data, 64 MiB of random data changed per cycle, {cycles} cycles "
          "(medians)")  # fmt: skip
    print(f"{'':>22} {'bytes sent':>12} {'seconds':>8} {'CPU s':>7}")
    for label, rows in (("ferry delta cycle", ferry_rows), ("rsync --inplace", rsync_rows)):
        print(f"{label:>22} {med(rows, 0) / MiB:9.1f} MiB {med(rows, 1):8.2f} {med(rows, 2):7.2f}")
    print(f"{'ratio ferry / rsync':>22} {med(ferry_rows, 0) / med(rsync_rows, 0):12.2f} "
          f"{med(ferry_rows, 1) / med(rsync_rows, 1):8.2f} "
          f"{med(ferry_rows, 2) / med(rsync_rows, 2):7.2f}")  # fmt: skip


async def https_cycles(lab_root: Path, uuid: str, cycles: int, scratch: Path) -> list[dict]:  # type: ignore[type-arg]
    from inject import TestMonitor, monitor_socket

    from ferry.client.fleet import Fleet
    from ferry.client.settings import load_settings

    rows = []
    async with TestMonitor(monitor_socket(lab_root, "host-1", uuid), "bench") as mon, \
            Fleet(load_settings()) as fleet:  # fmt: skip
        host = fleet.client("host-1")
        await mon.start_bare_bitmap()
        await host.post("/v1/vms/bench/replication/sync")  # the bitmaps start level
        await mon.bare_backup(scratch / "bare-0.qcow2", DISK, "0")
        for cycle in range(1, cycles + 1):
            await mon.random_writes(scratch, 64 * MiB, DISK, cycle)
            bare_s = await mon.bare_backup(scratch / f"bare-{cycle}.qcow2", DISK, str(cycle))
            bare_bytes = (scratch / f"bare-{cycle}.qcow2").stat().st_blocks * 512
            (scratch / f"bare-{cycle}.qcow2").unlink()
            t0 = time.monotonic()
            out = await host.post("/v1/vms/bench/replication/sync")
            wall = time.monotonic() - t0
            if out.get("result") != "ok":
                raise RuntimeError(f"sync failed: {out}")
            rows.append(
                {
                    "bare_s": bare_s,
                    "bare_bytes": bare_bytes,
                    "cycle_s": out["duration_s"],
                    "wall_s": wall,
                    "bytes": out["bytes"],
                    "phases": out.get("phases_s", {}),
                }
            )
            if os.environ.get("BENCH_VERBOSE"):
                print(f"cycle {cycle}: {rows[-1]}", file=sys.stderr)
    return rows


def run_https(cycles: int, root: Path) -> None:
    from ferry.lab import Lab

    os.environ["FERRY_HOME"] = str(root / "home")
    lab = Lab(root / "lab")
    try:
        lab.up(2, host_settings={"test_monitor": True})
        ferry("replica-server", "enable", "--host", "host-2", "--storage",
                  str(root / "replicas"), "--allow", "host-1")  # fmt: skip
        ferry("vm", "create", "bench", "--host", "host-1", "--guest", "test",
                  "--memory", "256M", "--disk", "4G", "--start")  # fmt: skip
        uuid = next(v["uuid"] for v in json.loads(ferry("vm", "list", "--json"))
                    if v["name"] == "bench")  # fmt: skip

        async def fill() -> None:
            from inject import TestMonitor, monitor_socket

            async with TestMonitor(monitor_socket(lab.root, "host-1", uuid), "bench") as mon:
                for i in range(16):  # 1 GiB in 16 runs of 64 MiB, spread over the disk
                    await mon.write((i * 256 + 64) * MiB, 64 * MiB, pattern=0x30 + i)
                await mon.flush()

        asyncio.run(fill())
        ferry("replication", "enable", "bench", "--replica", "host-2", "--frequency", "15m",
                  "--json")  # fmt: skip
        rows = asyncio.run(https_cycles(lab.root, uuid, cycles, root))
        ferry("vm", "pause", "bench")
        ferry("replication", "sync", "bench")
        disk = next(lab.root.glob(f"hosts/host-1/**/vms/{uuid}/*.qcow2"))
        latest = max((root / "replicas").glob(f"**/{uuid}/p*-disk0.qcow2"),
                     key=lambda p: int(p.name[1:].split("-")[0]))  # fmt: skip
        same = subprocess.run(["qemu-img", "compare", "-U", str(latest), str(disk)],
                              capture_output=True).returncode == 0  # fmt: skip
        log = (lab.root / "hosts" / "host-2" / "agent.log").read_text(errors="replace")
        replica_side = [line.split(": ", 1)[-1] for line in log.splitlines()
                        if "linked recovery point" in line][-cycles - 1 : -1]  # fmt: skip
    finally:
        lab.down()

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    phases = sorted({k for r in rows for k in r["phases"]})
    print(f"through the agents' HTTPS: 4 GiB disk, 1 GiB data, 64 MiB random data changed per "
          f"cycle, {cycles} cycles (medians)")  # fmt: skip
    print(f"  bare incremental backup  {med('bare_s'):6.3f} s  ({med('bare_bytes') / MiB:.1f} MiB "
          "file)")  # fmt: skip
    print(f"  replication sync cycle   {med('cycle_s'):6.3f} s  (client wall {med('wall_s'):.3f} s)"
          f"; ratio cycle / bare = {med('cycle_s') / med('bare_s'):.2f} (goal <= 2)")  # fmt: skip
    print(
        "  phases: "
        + ", ".join(
            f"{k} {statistics.median(r['phases'].get(k, 0.0) for r in rows):.3f} s" for k in phases
        )
    )
    print(f"  bytes sent {med('bytes') / MiB:.1f} MiB; / changed 64 MiB = "
          f"{med('bytes') / (64 * MiB):.3f} (goal <= 1.05)")  # fmt: skip
    print(f"  replica latest point == primary disk (paused, after a last sync): {same}")
    for line in replica_side:
        print(f"  replica: {line}")
    assert same, "the replica differs from the primary"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument(
        "--https",
        action="store_true",
        help="the whole cycle through two lab agents (see the docstring)",
    )
    args = parser.parse_args()
    if args.https:
        with tempfile.TemporaryDirectory(prefix="ferry-bench-rh-", dir="/var/tmp") as tmp:
            run_https(args.cycles, Path(tmp))
        return
    if shutil.which("rsync") is None:
        raise SystemExit("rsync is not installed: apt-get install -y rsync")
    with tempfile.TemporaryDirectory(prefix="ferry-bench-r-", dir="/var/tmp") as tmp:
        asyncio.run(run(args.cycles, Path(tmp), bool(os.environ.get("BENCH_VERBOSE"))))


if __name__ == "__main__":
    main()
