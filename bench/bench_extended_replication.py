"""Extended replication benchmark: several recovery points forwarded as one overlay.

Run: ``.venv/bin/python bench/bench_extended_replication.py [--points 6]``

A replica's chain on disk: a 1 GiB qcow2 base holding 256 MiB of random
data, then N overlays (recovery points), each with 16 MiB of fresh random
data: 8 MiB over the same hot region every time (a database's busy pages)
and 8 MiB somewhere new. An extended host that is behind by those N points
needs what changed since the base. In the same run:

- ferry's way: ``combine_overlays`` (copies of the overlays committed into a
  copy of the oldest) and the delta stream of that one file (``encode_point``,
  zstd), as an extension cycle does;
- the baseline: the delta stream of every overlay, one after the other, as a
  forwarder of each point would send them.

Printed: bytes on the wire, seconds (stream encoding included, the network
left out on both sides), their ratios, and whether the combined overlay reads
exactly like the top of the chain (``qemu-img compare``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

from ferry.adapters import qemu_img
from ferry.adapters.point_transfer import combine_overlays, encode_point

MiB = 1024**2
GiB = 1024**3


def qemu_io(image: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    subprocess.run([*args, str(image)], check=True, capture_output=True)


def random_file(path: Path, size: int) -> Path:
    with path.open("wb") as out:
        for _ in range(size // MiB):
            out.write(os.urandom(MiB))
    return path


async def build_chain(root: Path, points: int) -> tuple[Path, list[Path]]:
    base = root / "base.qcow2"
    await qemu_img.create(base, GiB)
    data = random_file(root / "random", 16 * MiB)
    # 256 MiB of data in the base, 16 MiB at a time, spread over the disk.
    qemu_io(base, *[f"write -s {data} {i * 64 * MiB} {16 * MiB}" for i in range(16)])
    overlays: list[Path] = []
    below = base
    for n in range(points):
        overlay = root / f"p{n}.qcow2"
        await qemu_img.create_overlay(overlay, below, GiB)
        fresh = random_file(root / "random", 16 * MiB)
        hot = 8 * MiB  # the same region every point
        new = 512 * MiB + n * 24 * MiB  # a region no earlier point touched
        qemu_io(overlay, f"write -s {fresh} {hot} {8 * MiB}",
                f"write -s {fresh} {new} {8 * MiB}")  # fmt: skip
        overlays.append(overlay)
        below = overlay
    return base, overlays


def stream_bytes(files: list[Path]) -> int:
    return sum(len(frame) for frame in
               encode_point(files, vm_uuid=uuidlib.uuid4(), point_id=1))  # fmt: skip


async def run(points: int, root: Path) -> None:
    base, overlays = await build_chain(root, points)
    start = time.perf_counter()
    combined = root / "combined.qcow2"
    await combine_overlays(overlays, base, combined)
    ferry_bytes = await asyncio.to_thread(stream_bytes, [combined])
    ferry_s = time.perf_counter() - start

    start = time.perf_counter()
    each_bytes = 0
    for overlay in overlays:
        each_bytes += await asyncio.to_thread(stream_bytes, [overlay])
    each_s = time.perf_counter() - start

    same = subprocess.run(["qemu-img", "compare", "-U", str(combined), str(overlays[-1])],
                          capture_output=True).returncode == 0  # fmt: skip
    print(f"{points} recovery points of 16 MiB each (8 MiB rewritten in the same place), "
          "1 GiB disk with 256 MiB of data")  # fmt: skip
    print(f"ferry (combine, one stream): {ferry_bytes / MiB:7.1f} MiB  {ferry_s:6.2f} s")
    print(f"each point streamed        : {each_bytes / MiB:7.1f} MiB  {each_s:6.2f} s")
    print(f"ratio ferry / each: bytes {ferry_bytes / each_bytes:.2f}, time {ferry_s / each_s:.2f}")
    print(f"combined overlay reads like the top of the chain: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ferry-bench-ext-") as tmp:
        asyncio.run(run(args.points, Path(tmp)))


if __name__ == "__main__":
    main()
