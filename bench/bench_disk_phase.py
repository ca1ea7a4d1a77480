"""Disk phase of a shared-nothing move against qemu-img convert, local and over NBD/TLS.

Run: ``.venv/bin/python bench/bench_disk_phase.py [--runs 2] [--move]``

One 4 GiB qcow2 holding 1 GiB of data (bench_migration's scenario c), in one
process, each run in turn:

  - local: ``qemu-img convert -O qcow2`` of the image (the goal's baseline);
  - nbd: ``qemu-img convert -n --target-is-zero`` onto a destination QEMU's
    NBD export over TLS (the host certificates, ``tls-authz`` of the source
    host's DN: what a move's destination offers);
  - mirror, QEMU defaults: ``blockdev-mirror sync=full`` as ferry ran it
    before (64 KiB granularity, 16 MiB in flight), from a source QEMU holding
    the image, until READY;
  - mirror, ferry: the arguments of ``ferry.adapters.migration.disk_copy``;
  - with ``--move``: ``ferry vm move --storage copy`` of a 256 MiB test guest
    booted from the image in a two-host lab (its ``disk_copy_s`` and
    ``disk_bytes``).

Both QEMUs are ``-machine none`` processes (the mirror is the main loop's
work; the destination of a move is paused too). Prints seconds, MiB/s of
data, the ratios to both baselines, and for each copy the bytes that
arrived as data on the destination (``qemu-img map``) against the source's
allocation: zeroes and unallocated clusters must not arrive as data.
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

from ferry.adapters import pki
from ferry.adapters.migration.disk_copy import mirror_arguments, nbd_target

GiB = 1024**3
MiB = 1024**2
SOURCE_DN = "O=ferry,OU=hosts,CN=host-1"


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def data_bytes(image: Path) -> int:
    """Bytes of ``image`` that read as data (allocated, not zero clusters)."""
    extents = json.loads(run("qemu-img", "map", "-U", "--output=json", str(image)))
    return sum(e["length"] for e in extents if e["data"] and not e["zero"])


class Qemu:
    """A ``-machine none`` QEMU holding one qcow2 as node ``disk0``."""

    def __init__(self, work: Path, name: str, disk: Path) -> None:
        self.sock = work / f"{name}.qmp"
        pidfile = work / f"{name}.pid"
        file_node = {"driver": "file", "filename": str(disk), "node-name": "file0"}
        fmt_node = {"driver": "qcow2", "file": "file0", "node-name": "disk0"}
        subprocess.run(["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display",
                        "none", "-daemonize", "-pidfile", str(pidfile),
                        "-qmp", f"unix:{self.sock},server=on,wait=off",
                        "-blockdev", json.dumps(file_node),
                        "-blockdev", json.dumps(fmt_node)], check=True)  # fmt: skip
        self.pid = int(pidfile.read_text())
        self.qmp = QMPClient(name)

    async def connect(self) -> QMPClient:
        for _ in range(200):
            with contextlib.suppress(Exception):
                await self.qmp.connect(str(self.sock))
                return self.qmp
            await asyncio.sleep(0.05)
        raise RuntimeError(f"no QMP at {self.sock}")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, 9)


async def destination(work: Path, tls: Path, port: int) -> tuple[Qemu, Path]:
    """A QEMU exporting a new empty 4 GiB qcow2 over NBD with TLS, as a move's destination."""
    disk = work / "dst.qcow2"
    disk.unlink(missing_ok=True)
    run("qemu-img", "create", "-q", "-f", "qcow2", str(disk), "4G")
    dst = Qemu(work, "dst", disk)
    qmp = await dst.connect()
    await qmp.execute("object-add", {"qom-type": "tls-creds-x509", "id": "t",
                                     "endpoint": "server", "dir": str(tls),
                                     "verify-peer": True})  # fmt: skip
    await qmp.execute("object-add", {"qom-type": "authz-simple", "id": "a",
                                     "identity": SOURCE_DN})  # fmt: skip
    await qmp.execute("nbd-server-start", {
        "addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}},
        "tls-creds": "t", "tls-authz": "a"})  # fmt: skip
    await qmp.execute("block-export-add", {"type": "nbd", "id": "e0", "node-name": "disk0",
                                           "name": "disk0", "writable": True})  # fmt: skip
    return dst, disk


async def convert_over_nbd(work: Path, image: Path, tls: dict[str, Path]) -> dict[str, Any]:
    dst, disk = await destination(work, tls["host-2"], 10970)
    try:
        started = time.monotonic()
        run("qemu-img", "convert", "-n", "--target-is-zero",
            "--object", f"tls-creds-x509,id=t,endpoint=client,dir={tls['host-1']}",
            "-f", "qcow2", str(image), "--target-image-opts",
            "driver=nbd,host=127.0.0.1,port=10970,export=disk0,tls-creds=t,"
            "tls-hostname=host-2")  # fmt: skip
        seconds = time.monotonic() - started
    finally:
        await dst.close()
    return {"s": seconds, "arrived": data_bytes(disk)}


async def mirror(work: Path, image: Path, tls: dict[str, Path], *, tuned: bool) -> dict[str, Any]:
    dst, disk = await destination(work, tls["host-2"], 10971)
    src = Qemu(work, "src", image)
    try:
        qmp = await src.connect()
        await qmp.execute("object-add", {"qom-type": "tls-creds-x509", "id": "t",
                                         "endpoint": "client", "dir": str(tls["host-1"]),
                                         "verify-peer": True})  # fmt: skip
        if tuned:
            node = nbd_target("n0", "disk0", ("127.0.0.1", 10971), tls_id="t",
                              tls_hostname="host-2")  # fmt: skip
            job = mirror_arguments("m0", "disk0", "n0", speed=GiB)
        else:  # ferry's arguments before: QEMU's defaults
            node = {"driver": "nbd", "node-name": "n0", "export": "disk0",
                    "server": {"type": "inet", "host": "127.0.0.1", "port": "10971"},
                    "tls-creds": "t", "tls-hostname": "host-2"}  # fmt: skip
            job = {"job-id": "m0", "device": "disk0", "target": "n0", "sync": "full",
                   "speed": GiB}  # fmt: skip
        await qmp.execute("blockdev-add", node)
        started = time.monotonic()
        await qmp.execute("blockdev-mirror", job)
        while True:
            jobs = await qmp.execute("query-block-jobs")
            if jobs and jobs[0].get("ready"):
                break
            await asyncio.sleep(0.02)
        seconds = time.monotonic() - started
        await qmp.execute("block-job-cancel", {"device": "m0"})
        while await qmp.execute("query-block-jobs"):
            await asyncio.sleep(0.02)
    finally:
        await src.close()
        await dst.close()
    return {"s": seconds, "arrived": data_bytes(disk), "job_len": jobs[0]["len"]}


def ferry_move(root: Path, image: Path, run_index: int) -> dict[str, Any]:
    """One ``ferry vm move --storage copy`` of a test guest on the image; its result."""
    env = dict(os.environ, FERRY_HOME=str(root / "home"))

    def ferry(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "ferry", *args], check=True, text=True,
                              capture_output=True, env=env).stdout  # fmt: skip

    name = f"disk-phase-{run_index}"
    ferry("vm", "create", name, "--host", "host-1", "--guest", "test", "--memory", "256M",
          "--image", str(image), "--start")  # fmt: skip
    time.sleep(3)  # booting (the disk phase does not need the guest's records)
    lines = ferry("vm", "move", name, "--to", "host-2", "--storage", "copy", "--json")
    result: dict[str, Any] = json.loads(lines.splitlines()[-1])
    ferry("vm", "delete", name, "--force")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--move", action="store_true", help="also time ferry vm move (a lab)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ferry-bench-disk-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        pki.create_ca(root / "ca", name="bench-ca")
        tls = {h: root / h for h in ("host-1", "host-2")}
        for host, path in tls.items():
            pki.issue_host_cert(root / "ca", path, host, ips=["127.0.0.1"])
        image = root / "data.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "4G")
        run("qemu-io", "-c", "write -P 0x5a 64M 1G", str(image))
        allocated = data_bytes(image)
        rows: dict[str, list[dict[str, Any]]] = {
            "local convert": [], "convert onto NBD/TLS": [],
            "mirror, QEMU defaults": [], "mirror, ferry": [],
        }  # fmt: skip
        for _ in range(args.runs):
            started = time.monotonic()
            run("qemu-img", "convert", "-O", "qcow2", str(image), str(root / "local.qcow2"))
            rows["local convert"].append({"s": time.monotonic() - started,
                                          "arrived": data_bytes(root / "local.qcow2")})  # fmt: skip
            (root / "local.qcow2").unlink()
            rows["convert onto NBD/TLS"].append(asyncio.run(convert_over_nbd(root, image, tls)))
            rows["mirror, QEMU defaults"].append(asyncio.run(mirror(root, image, tls,
                                                                    tuned=False)))  # fmt: skip
            rows["mirror, ferry"].append(asyncio.run(mirror(root, image, tls, tuned=True)))
        if args.move:
            from ferry.lab import Lab

            os.environ["FERRY_HOME"] = str(root / "home")
            lab = Lab(root / "lab")
            lab.up(2)
            try:
                lab_image = lab.images_dir / "data.qcow2"
                run("cp", "--sparse=always", str(image), str(lab_image))
                moves = [ferry_move(root, lab_image, i) for i in range(args.runs)]
            finally:
                lab.down()
            rows["ferry vm move (disk phase)"] = [
                {"s": m["disk_copy_s"], "arrived": m.get("disk_bytes", 0)} for m in moves
            ]
    load = os.getloadavg()
    print(
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs; "
        f"{args.runs} run(s), medians; source allocation {allocated / MiB:.0f} MiB of data"
    )
    med = {name: statistics.median(r["s"] for r in runs) for name, runs in rows.items()}
    local, nbd = med["local convert"], med["convert onto NBD/TLS"]
    for name, runs in rows.items():
        arrived = max(r["arrived"] for r in runs)
        print(
            f"{name:>28}: {med[name]:6.2f} s {allocated / med[name] / MiB:6.0f} MiB/s; "
            f"/ local {med[name] / local:5.2f}x, / NBD {med[name] / nbd:5.2f}x; "
            f"data bytes {arrived / MiB:.0f} MiB ({arrived / allocated:.2f}x allocation)"
        )
    if os.environ.get("BENCH_VERBOSE"):
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
