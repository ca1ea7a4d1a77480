"""Resync with real qemu-img and qemu-io: block hashes find the changed blocks, a patch fixes them.

Two qcow2 disks share most of their content and differ in a few known blocks
(data against other data, data against zeros both ways, a change in the short
last block). The hashes must name exactly those blocks, see through backing
chains, and a patch of them put over the replica's disk must read the same as
the primary's.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ferry.adapters.block_hashes import (
    BLOCK_SIZE,
    build_patch,
    differing_blocks,
    image_block_hashes,
    read_raw_view,
)
from ferry.errors import InvalidInputError, QemuError

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
KIB = 1024
SIZE = 8 * MIB + 64 * KIB  # nine blocks, the last one 64 KiB
BLOCKS = 9

# Blocks where the primary (A) and the replica (B) differ, and why:
#  1: a 4 KiB change inside the block       3: data in A, zeroed in B
#  4: different random data                 5: zeroed in A, data in B
#  8: a change in the short last block
CHANGED = [1, 3, 4, 5, 8]
ZEROED_IN_A = 5
ZERO_DIGEST = hashlib.sha256(bytes(BLOCK_SIZE)).hexdigest()


def qemu_io(image: Path, *commands: str, cwd: Path | None = None) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    subprocess.run([*args, str(image)], check=True, capture_output=True, cwd=cwd)


def create(path: Path, size: int = SIZE, backing: Path | None = None) -> Path:
    extra = ["-b", str(backing), "-F", "qcow2"] if backing else []
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *extra, str(path), str(size)],
                   check=True)  # fmt: skip
    return path


def block_range(index: int, block_size: int = BLOCK_SIZE, size: int = SIZE) -> tuple[int, int]:
    return index * block_size, min((index + 1) * block_size, size)


def reference_hashes(image: Path, tmp_path: Path) -> list[str]:
    """SHA-256 per block, computed without the adapter (qemu-img convert + hashlib)."""
    raw = tmp_path / f"{image.name}.reference.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)],
                   check=True)  # fmt: skip
    data = raw.read_bytes()
    raw.unlink()
    return [hashlib.sha256(data[i : i + BLOCK_SIZE]).hexdigest()
            for i in range(0, len(data), BLOCK_SIZE)]  # fmt: skip


def same_image(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", str(a), str(b)],
                          capture_output=True).returncode == 0  # fmt: skip


@pytest.fixture
def disks(tmp_path: Path) -> tuple[Path, Path]:
    """The primary's disk A and the replica's disk B, differing in the blocks CHANGED."""
    patterns = tmp_path / "patterns"
    patterns.mkdir()
    for name in ("shared", "ours", "theirs"):
        (patterns / name).write_bytes(os.urandom(MIB))
    common = [
        "write -P 0x11 0 8M",  # every block holds data...
        "write -P 0x12 8M 64k",  # ...the short last one too
        "write -s shared 2M 1M",  # same random data in both
        "write -P 0x77 6M 1M",
    ]
    a = create(tmp_path / "A.qcow2")
    b = create(tmp_path / "B.qcow2")
    qemu_io(a, *common, cwd=patterns)
    qemu_io(b, *common, cwd=patterns)
    qemu_io(a, "write -P 0x22 1052672 4k", "write -P 0x44 3M 1M", "write -s ours 4M 1M",
            "write -z 5M 1M", "write -P 0x66 8449024 4k", cwd=patterns)  # fmt: skip
    qemu_io(b, "write -P 0x33 1052672 4k", "write -z 3M 1M", "write -s theirs 4M 1M",
            "write -P 0x55 5M 1M", cwd=patterns)  # fmt: skip
    # Same bytes written differently: not a difference. Block 6 in two halves
    # in B; block 7 holds written zeros in A and zero clusters in B.
    qemu_io(b, "write -P 0x77 6M 512k", "write -P 0x77 6656k 512k")
    qemu_io(a, "write -P 0 7M 1M")
    qemu_io(b, "write -z 7M 1M")
    return a, b


def test_hashes_name_exactly_the_changed_blocks(disks: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = disks
    ours = asyncio.run(image_block_hashes(a, scratch_dir=tmp_path))
    theirs = asyncio.run(image_block_hashes(b, scratch_dir=tmp_path))

    assert len(ours) == len(theirs) == BLOCKS
    assert ours == reference_hashes(a, tmp_path)
    assert theirs == reference_hashes(b, tmp_path)
    assert differing_blocks(ours, theirs) == CHANGED
    assert ours[ZEROED_IN_A] == ZERO_DIGEST
    # The raw views were scratch files: nothing is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A.qcow2", "B.qcow2", "patterns"]


def test_hashes_read_through_the_backing_chain(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2")
    qemu_io(base, "write -P 0x01 0 8M", "write -P 0x02 8M 64k")
    middle = create(tmp_path / "middle.qcow2", backing=base)
    # Zero clusters hide base data (block 2); block 3 reads zeros, then data.
    qemu_io(middle, "write -P 0x03 1M 1M", "write -z 2M 2M")
    top = create(tmp_path / "top.qcow2", backing=middle)
    qemu_io(top, "write -P 0x04 1536k 4k", "write -P 0x06 3584k 4k", "write -P 0x05 8M 4k")
    flat = tmp_path / "flat.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", str(top), str(flat)],
                   check=True)  # fmt: skip
    raw = tmp_path / "flat.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(top), str(raw)],
                   check=True)  # fmt: skip

    chain = asyncio.run(image_block_hashes(top, scratch_dir=tmp_path))
    flattened = asyncio.run(image_block_hashes(flat, scratch_dir=tmp_path))
    in_place = asyncio.run(image_block_hashes(raw, scratch_dir=tmp_path, fmt="raw"))
    base_only = asyncio.run(image_block_hashes(base, scratch_dir=tmp_path))

    assert chain == flattened == in_place == reference_hashes(flat, tmp_path)
    assert chain[2] == ZERO_DIGEST  # the middle layer's zeros, not the base's 0x01
    assert differing_blocks(chain, base_only) == [1, 2, 3, 8]


def test_patch_over_the_replica_reads_as_the_primary(
    disks: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = disks
    assert not same_image(a, b)
    blocks = differing_blocks(asyncio.run(image_block_hashes(a, scratch_dir=tmp_path)),
                              asyncio.run(image_block_hashes(b, scratch_dir=tmp_path)))  # fmt: skip
    patch = tmp_path / "patch.qcow2"

    async def make_patch() -> int:
        raw = await read_raw_view(a, scratch_dir=tmp_path)
        try:
            return await build_patch(raw, blocks, patch, virtual_size=SIZE)
        finally:
            raw.unlink()

    written = asyncio.run(make_patch())
    subprocess.run(["qemu-img", "rebase", "-u", "-b", str(b), "-F", "qcow2", str(patch)],
                   check=True)  # fmt: skip

    assert same_image(patch, a)
    # The zeroed block hides B's 0x55 (qemu-io exits 1 if the pattern does not match).
    qemu_io(patch, "read -P 0 5M 1M")
    assert written == 3 * MIB + 64 * KIB  # blocks 1, 3, 4 and the 64 KiB block 8; 5 is zeros
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(patch)],
                                     check=True, capture_output=True).stdout)  # fmt: skip
    assert info["cluster-size"] == 64 * KIB
    assert info["virtual-size"] == SIZE
    # Nothing but the staged blocks' files was made, and they are gone.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "A.qcow2", "B.qcow2", "patch.qcow2", "patterns"]  # fmt: skip


def test_patch_allocates_only_the_differing_blocks(
    disks: tuple[Path, Path], tmp_path: Path
) -> None:
    a, _ = disks
    raw = asyncio.run(read_raw_view(a, scratch_dir=tmp_path))
    patch = tmp_path / "patch.qcow2"
    written = asyncio.run(build_patch(raw, CHANGED, patch, virtual_size=SIZE))
    extents = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(patch)],
                                        check=True, capture_output=True).stdout)  # fmt: skip

    assert written == sum(block_range(i)[1] - block_range(i)[0]
                          for i in CHANGED if i != ZEROED_IN_A)  # fmt: skip
    allocated = {}  # byte offset of each allocated 64 KiB cluster -> holds data
    for extent in extents:
        if extent["present"]:
            for offset in range(extent["start"], extent["start"] + extent["length"], 64 * KIB):
                allocated[offset] = extent["data"]
    expected = {}
    for index in CHANGED:
        start, stop = block_range(index)
        for offset in range(start, stop, 64 * KIB):
            expected[offset] = index != ZEROED_IN_A
    assert allocated == expected


def test_patch_spanning_several_qemu_io_runs(tmp_path: Path) -> None:
    """Small blocks: more differing blocks than one qemu-io process writes."""
    block = 64 * KIB
    noise = tmp_path / "noise"
    noise.write_bytes(os.urandom(7 * MIB))
    a = create(tmp_path / "A.qcow2")
    qemu_io(a, f"write -s {noise.name} 0 7M", cwd=tmp_path)
    b = create(tmp_path / "B.qcow2")
    qemu_io(b, "write -P 0x99 0 8M", "write -P 0x98 8M 64k")
    ours = asyncio.run(image_block_hashes(a, scratch_dir=tmp_path, block_size=block))
    theirs = asyncio.run(image_block_hashes(b, scratch_dir=tmp_path, block_size=block))
    blocks = differing_blocks(ours, theirs)
    assert blocks == list(range(SIZE // block))  # every block: noise or zeros against 0x99

    raw = asyncio.run(read_raw_view(a, scratch_dir=tmp_path))
    patch = tmp_path / "patch.qcow2"
    written = asyncio.run(build_patch(raw, blocks, patch, virtual_size=SIZE, block_size=block))
    subprocess.run(["qemu-img", "rebase", "-u", "-b", str(b), "-F", "qcow2", str(patch)],
                   check=True)  # fmt: skip

    assert written == 7 * MIB
    assert same_image(patch, a)


def test_disks_of_different_sizes_are_refused() -> None:
    assert differing_blocks(["a", "b", "c"], ["a", "x", "c"]) == [1]
    with pytest.raises(InvalidInputError, match="differ in size"):
        differing_blocks(["a", "b", "c"], ["a", "b"])
    with pytest.raises(InvalidInputError, match="differ in size"):
        differing_blocks([], ["a"])


def test_tool_failures_become_qemu_errors(disks: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = disks
    with pytest.raises(QemuError, match=r"qemu-img convert of .*nothing\.qcow2 failed: ") as info:
        asyncio.run(image_block_hashes(tmp_path / "nothing.qcow2", scratch_dir=tmp_path))
    assert "\n" not in str(info.value)
    assert "No such file" in str(info.value)

    raw = asyncio.run(read_raw_view(a, scratch_dir=tmp_path))
    patch = tmp_path / "patch.qcow2"
    with pytest.raises(QemuError, match="cannot run"):
        asyncio.run(build_patch(raw, CHANGED, patch, virtual_size=SIZE,
                                qemu_io_bin=str(tmp_path / "no-qemu-io")))  # fmt: skip
    assert not patch.exists()  # a half-made patch is removed
    # A qemu-img that makes the patch too small: qemu-io's writes past its end
    # fail, and qemu-io reports that on stdout, not stderr.
    shrinking = tmp_path / "shrinking-qemu-img"
    shrinking.write_text(f"#!{sys.executable}\n"
                         "import os, sys\n"
                         "args = sys.argv[1:]\n"
                         "if args[0] == 'create':\n"
                         "    args[-1] = '1M'\n"
                         "os.execvp('qemu-img', ['qemu-img', *args])\n")  # fmt: skip
    shrinking.chmod(0o755)
    with pytest.raises(QemuError, match=r"qemu-io on .*patch.qcow2 failed: .*Input/output error"):
        asyncio.run(build_patch(raw, CHANGED, patch, virtual_size=SIZE,
                                qemu_img_bin=str(shrinking)))  # fmt: skip
    assert not patch.exists()
    with pytest.raises(InvalidInputError, match="whole"):
        asyncio.run(build_patch(raw, [1], patch, virtual_size=SIZE, block_size=4 * KIB))
    with pytest.raises(InvalidInputError, match="outside"):
        asyncio.run(build_patch(raw, [BLOCKS], patch, virtual_size=SIZE))
    with pytest.raises(InvalidInputError, match="holds"):
        asyncio.run(build_patch(raw, [1], patch, virtual_size=SIZE + MIB))
