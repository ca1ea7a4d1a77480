"""Export/import benchmark: ferry against qemu-img convert and cp --sparse=always.

Run: ``.venv/bin/python bench/bench_exchange.py [--runs 2]``

One 4 GiB qcow2 disk holding 1 GiB of data, in the same run:
  - ``ferry vm export`` (offline: consolidated qcow2 + SHA-256 manifest)
  - ``ferry vm import --mode copy`` of that folder (verifies every checksum,
    checks headers, copies into the host)
  - baselines: ``qemu-img convert -O qcow2`` and ``cp --sparse=always`` of the
    same image
  - for the breakdown: SHA-256 of the exported disk file alone (what an
    export pays on top of the convert; the import now hashes while it
    copies), and the convert followed by an fsync of its output (an export
    makes every file durable before its manifest)
Prints the load, seconds and throughput (data bytes / s) and ratios ferry /
baseline.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ferry.adapters.hashed_copy import sha256_file
from ferry.lab import Lab

GiB = 1024**3


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    started = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, env=env)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ferry-bench-x-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        env = dict(os.environ, FERRY_HOME=str(root / "home"))
        os.environ["FERRY_HOME"] = env["FERRY_HOME"]
        lab = Lab(root / "lab")
        lab.up(1)
        ferry = [sys.executable, "-m", "ferry"]
        try:
            image = lab.images_dir / "source.qcow2"
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4G"], check=True
            )
            subprocess.run(["qemu-io", "-c", "write -P 0x5a 512M 1G", str(image)], check=True,
                           capture_output=True)  # fmt: skip
            subprocess.run([*ferry, "vm", "create", "big", "--host", "host-1", "--image",
                            str(image)], check=True, env=env, capture_output=True)  # fmt: skip
            export_s, import_s, convert_s, cp_s, hash_s, sync_s = [], [], [], [], [], []
            for run in range(args.runs):
                folder = lab.images_dir / f"export-{run}"
                export_s.append(timed([*ferry, "vm", "export", "big", "--to", str(folder)], env))
                importing = [*ferry, "vm", "import", str(folder), "--host", "host-1",
                             "--mode", "new-id", "--name", f"copy-{run}"]  # fmt: skip
                import_s.append(timed(importing, env))
                started = time.monotonic()
                sha256_file(folder / "disk0.qcow2")
                hash_s.append(time.monotonic() - started)
                convert_s.append(timed(["qemu-img", "convert", "-O", "qcow2", str(image),
                                        str(root / f"convert-{run}.qcow2")]))  # fmt: skip
                cp_s.append(timed(["cp", "--sparse=always", str(image), str(root / f"cp-{run}")]))
                synced = root / f"synced-{run}.qcow2"
                started = time.monotonic()
                subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(image), str(synced)],
                               check=True)  # fmt: skip
                with synced.open("rb") as handle:
                    os.fsync(handle.fileno())
                sync_s.append(time.monotonic() - started)
                synced.unlink()
                shutil.rmtree(folder)
                (root / f"convert-{run}.qcow2").unlink()
                (root / f"cp-{run}").unlink()
                subprocess.run([*ferry, "vm", "delete", f"copy-{run}"], check=True, env=env,
                               capture_output=True)  # fmt: skip
        finally:
            lab.down()
    rows = {"ferry export": export_s, "ferry import (copy)": import_s,
            "qemu-img convert": convert_s, "cp --sparse=always": cp_s,
            "sha256 of the disk": hash_s, "convert + fsync": sync_s}  # fmt: skip
    load = os.getloadavg()
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs, "
          f"{args.runs} run(s), medians")  # fmt: skip
    med = {name: statistics.median(values) for name, values in rows.items()}
    for name, seconds in med.items():
        print(f"{name:>22}: {seconds:6.2f} s  {GiB / seconds / 1024**2:7.0f} MiB/s of data")
    for name in ("ferry export", "ferry import (copy)"):
        print(
            f"{name} / qemu-img convert = {med[name] / med['qemu-img convert']:.2f}x, "
            f"/ cp --sparse=always = {med[name] / med['cp --sparse=always']:.2f}x, "
            f"/ convert + fsync = {med[name] / med['convert + fsync']:.2f}x"
        )


if __name__ == "__main__":
    main()
