"""Resynchronising a replica: block hashes of two disks, a qcow2 patch of the blocks that differ.

When a replica's chain no longer matches the primary (a lost recovery point, a
replica that ran after a failover), only the blocks that differ travel: each
side hashes its disk's *virtual* content (the whole backing chain) block by
block with :func:`image_block_hashes`, :func:`differing_blocks` compares the two
lists, and :func:`build_patch` makes a qcow2 holding exactly those blocks. Put
on top of the replica's image (``qemu-img rebase -u``) the patch reads the same
as the primary's disk.

The hash list is what crosses the wire, so its format is fixed here: entry
``i`` is the lowercase hex SHA-256 of the bytes ``[i * block_size, (i + 1) *
block_size)`` of the virtual disk, the last block clipped to the virtual size
(so it may be shorter). SHA-256 rather than BLAKE2b: with the SHA extensions
of current x86 and ARM CPUs it hashes 2-3 times faster than CPython's BLAKE2b.
Two disks whose sizes differ only inside the last block give the same number
of hashes; their last hashes differ (different lengths), so that block is
patched, but the caller still has to compare the virtual sizes.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ferry.adapters.os_errors import os_error, os_errors
from ferry.adapters.qemu_img import _DIE_WITH_PARENT
from ferry.errors import InvalidInputError, QemuError

log = logging.getLogger(__name__)

BLOCK_SIZE = 1024 * 1024

# The patch's cluster size. A block must cover whole clusters: a write to part
# of a cluster allocates all of it, and in a patch without a backing file the
# rest of that cluster reads as zeros, which would hide the replica's data of
# a neighbouring block that did not differ.
_CLUSTER_SIZE = 64 * 1024

# Hashing runs in the thread pool this many bytes at a time, so cancelling a
# resync of a large disk waits for at most one batch.
_HASH_BATCH_BYTES = 64 * 1024 * 1024

# qemu-io writes this many blocks per process: one image open per batch, and
# at most this many staged block files on disk at once.
_PATCH_BATCH_BLOCKS = 64

# Room for a few qemu lines in one error message.
_REASON_MAX = 400


async def image_block_hashes(
    image: Path,
    *,
    scratch_dir: Path,
    block_size: int = BLOCK_SIZE,
    fmt: str = "qcow2",
    qemu_img_bin: str = "qemu-img",
) -> list[str]:
    """SHA-256 hex digests of each block of ``image``'s virtual content (the whole backing chain).

    Block ``i`` covers ``[i * block_size, (i + 1) * block_size)`` clipped to the
    virtual size. A ``raw`` image is hashed in place; any other format is first
    read into a sparse raw view in ``scratch_dir`` (room for the image's
    allocated data is needed there), deleted afterwards.
    """
    _check_block_size(block_size)
    if fmt == "raw":
        return await _hash_file(image, block_size)
    raw = await read_raw_view(image, scratch_dir=scratch_dir, fmt=fmt, qemu_img_bin=qemu_img_bin)
    try:
        return await _hash_file(raw, block_size)
    finally:
        await _remove(raw)


async def read_raw_view(
    image: Path, *, scratch_dir: Path, fmt: str = "qcow2", qemu_img_bin: str = "qemu-img"
) -> Path:
    """``image``'s virtual content as a new sparse raw file in ``scratch_dir`` (caller deletes it).

    ``qemu-img convert`` leaves zero ranges (unallocated, zero clusters or
    written zeros) as holes, so the file costs only the data the disk holds.
    """
    try:
        fd, name = await asyncio.to_thread(
            tempfile.mkstemp, dir=scratch_dir, prefix=f".{image.name}.", suffix=".raw"
        )
        os.close(fd)
    except OSError as exc:
        raise os_error(f"cannot make a raw view of {image} in {scratch_dir}", exc) from exc
    raw = Path(name)
    try:
        await _run(qemu_img_bin, ["convert", "-f", fmt, "-O", "raw", str(image), str(raw)],
                   what=f"qemu-img convert of {image}")  # fmt: skip
    except BaseException:
        await _remove(raw)
        raise
    return raw


def differing_blocks(ours: Sequence[str], theirs: Sequence[str]) -> list[int]:
    """Indices of the blocks whose hashes differ, ascending.

    Lists of different lengths mean disks of different sizes, which a patch
    cannot reconcile: :class:`InvalidInputError`.
    """
    if len(ours) != len(theirs):
        raise InvalidInputError(
            f"the disks differ in size ({len(ours)} blocks here, {len(theirs)} on the other "
            "side); resize the replica's disk to the primary's before resynchronising"
        )
    return [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]


async def build_patch(
    raw_source: Path,
    blocks: Sequence[int],
    out: Path,
    *,
    virtual_size: int,
    block_size: int = BLOCK_SIZE,
    qemu_img_bin: str = "qemu-img",
    qemu_io_bin: str = "qemu-io",
) -> int:
    """Create the qcow2 ``out`` (no backing file, 64 KiB clusters) of ``raw_source``'s ``blocks``.

    Exactly the listed blocks are allocated in ``out``; every other block stays
    unallocated, so on top of another image it reads through. A listed block
    that is all zeros becomes zero clusters, which hide the older data below.
    ``raw_source`` is the primary disk's raw view (:func:`read_raw_view`), of
    ``virtual_size`` bytes. Returns the bytes of data written (zero blocks count
    0). On failure ``out`` is removed.
    """
    _check_block_size(block_size)
    if block_size % _CLUSTER_SIZE:
        raise InvalidInputError(
            f"a patch block of {block_size} bytes does not cover whole {_CLUSTER_SIZE}-byte "
            "clusters; use a multiple of 64 KiB"
        )
    try:
        source_size = await asyncio.to_thread(_file_size, raw_source)
    except OSError as exc:
        raise os_error(f"cannot read the raw view {raw_source}", exc) from exc
    if source_size != virtual_size:
        raise InvalidInputError(
            f"the raw view {raw_source} holds {source_size} bytes, the disk {virtual_size}"
        )
    count = _block_count(virtual_size, block_size)
    wanted = sorted(set(blocks))
    if wanted and (wanted[0] < 0 or wanted[-1] >= count):
        bad = wanted[0] if wanted[0] < 0 else wanted[-1]
        raise InvalidInputError(f"block {bad} is outside a disk of {count} blocks")

    create = ["create", "-q", "-f", "qcow2", "-o", f"cluster_size={_CLUSTER_SIZE}",
              str(out), str(virtual_size)]  # fmt: skip
    await _run(qemu_img_bin, create, what=f"qemu-img create of {out}")
    staging: Path | None = None
    try:
        try:
            staging = Path(await asyncio.to_thread(
                tempfile.mkdtemp, dir=out.parent, prefix=f".{out.name}.blocks-"))  # fmt: skip
        except OSError as exc:
            raise os_error(f"cannot stage blocks next to {out}", exc) from exc
        written = 0
        target = str(out.resolve())
        for first in range(0, len(wanted), _PATCH_BATCH_BLOCKS):
            batch = wanted[first : first + _PATCH_BATCH_BLOCKS]
            try:
                commands, data_bytes = await asyncio.to_thread(
                    _stage_blocks, raw_source, batch, staging, block_size, virtual_size
                )
            except OSError as exc:
                raise os_error(f"cannot stage blocks of {raw_source} in {staging}", exc) from exc
            # qemu-io splits a command at blanks and knows no quoting: the staged
            # files are named relative to its working directory.
            args = ["-f", "qcow2", "-t", "writeback"]
            for command in commands:
                args += ["-c", command]
            await _run(qemu_io_bin, [*args, target], what=f"qemu-io on {out}", cwd=staging)
            written += data_bytes
            with os_errors(f"cannot clear the staged blocks in {staging}"):
                await asyncio.to_thread(_unstage, staging)
    except BaseException:
        await _remove(out)
        raise
    finally:
        if staging is not None:
            await _remove(staging)
    return written


async def _remove(path: Path) -> None:
    """Delete a scratch file or directory in a thread: unlinking a GiB file takes up to a second.

    Safe in a task being cancelled (the thread finishes even if this await is
    cancelled again), and quiet: a cleanup failure must not hide the error
    being raised.
    """
    await asyncio.to_thread(_remove_now, path)


def _remove_now(path: Path) -> None:
    try:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc.strerror or exc)


def _check_block_size(block_size: int) -> None:
    if block_size <= 0:
        raise InvalidInputError(f"block size must be positive, not {block_size}")


def _block_count(size: int, block_size: int) -> int:
    return -(-size // block_size)


def _file_size(path: Path) -> int:
    """Size of a file or block device (whose ``st_size`` is 0)."""
    with path.open("rb", buffering=0) as handle:
        return os.lseek(handle.fileno(), 0, os.SEEK_END)


@functools.cache
def _zero_digest(length: int) -> str:
    return hashlib.sha256(bytes(length)).hexdigest()


def _is_hole(fd: int, start: int, length: int) -> bool:
    """True if the file holds no data in ``[start, start + length)`` (reads as zeros)."""
    try:
        data = os.lseek(fd, start, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data after start
            return True
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no SEEK_DATA here: read it
            return False
        raise
    return data >= start + length


def _read_block(fd: int, view: memoryview, start: int) -> None:
    """Fill ``view`` from ``start``; a file shorter than expected is an error."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], start + done)
        if got == 0:
            raise OSError(errno.EIO, f"file ends at {start + done}, inside a block")
        done += got


async def _hash_file(path: Path, block_size: int) -> list[str]:
    try:
        size = await asyncio.to_thread(_file_size, path)
        count = _block_count(size, block_size)
        step = max(1, _HASH_BATCH_BYTES // block_size)
        hashes: list[str] = []
        for first in range(0, count, step):
            hashes += await asyncio.to_thread(
                _hash_blocks, path, size, block_size, first, min(count, first + step)
            )
    except OSError as exc:
        raise os_error(f"cannot hash {path}", exc) from exc
    return hashes


def _hash_blocks(path: Path, size: int, block_size: int, first: int, stop: int) -> list[str]:
    """Hashes of blocks ``first`` to ``stop - 1``; holes are not read."""
    buffer = memoryview(bytearray(block_size))
    digests: list[str] = []
    with path.open("rb", buffering=0) as handle:
        fd = handle.fileno()
        for index in range(first, stop):
            start = index * block_size
            length = min(block_size, size - start)
            if _is_hole(fd, start, length):
                digests.append(_zero_digest(length))
                continue
            view = buffer[:length]
            _read_block(fd, view, start)
            digests.append(hashlib.sha256(view).hexdigest())
    return digests


def _stage_blocks(
    raw_source: Path, blocks: list[int], staging: Path, block_size: int, size: int
) -> tuple[list[str], int]:
    """qemu-io commands writing ``blocks``, and the data bytes among them.

    A data block is copied to its own file in ``staging`` (``write -s`` fills
    its buffer from the start of a file). A zero block becomes ``write -z``
    (zero clusters, not unmapped: ``-u`` is left out on purpose).
    """
    buffer = memoryview(bytearray(block_size))
    zeros = bytes(block_size)
    commands: list[str] = []
    data_bytes = 0
    with raw_source.open("rb", buffering=0) as handle:
        fd = handle.fileno()
        for index in blocks:
            start = index * block_size
            length = min(block_size, size - start)
            view = buffer[:length]
            if not _is_hole(fd, start, length):
                _read_block(fd, view, start)
                data = view.tobytes()  # bytes compare with memcmp, a memoryview byte by byte
                if data != zeros[:length]:
                    name = f"block-{index}"
                    (staging / name).write_bytes(data)
                    commands.append(f"write -q -s {name} {start} {length}")
                    data_bytes += length
                    continue
            commands.append(f"write -q -z {start} {length}")
    return commands, data_bytes


def _unstage(staging: Path) -> None:
    for entry in staging.iterdir():
        entry.unlink()


async def _run(tool: str, args: list[str], *, what: str, cwd: Path | None = None) -> None:
    """Run a qemu tool to completion; a failure is a ``QemuError`` with its reason in one line."""
    if shutil.which(tool) is None:  # else setpriv, not exec, would be the one to find out
        raise QemuError(f"cannot run {tool}: not found; install qemu-utils")
    try:
        proc = await asyncio.create_subprocess_exec(
            *_DIE_WITH_PARENT, tool, *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
        )  # fmt: skip
    except OSError as exc:
        raise QemuError(f"cannot run {tool}: {exc.strerror}; install qemu-utils") from exc
    try:
        stdout, stderr = await proc.communicate()
    except BaseException:
        # A cancelled resync must not leave a convert filling a scratch file
        # that is about to be deleted.
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        raise QemuError(f"{what} failed: {_reason(stdout, stderr, proc.returncode)}")


def _reason(stdout: bytes, stderr: bytes, returncode: int | None) -> str:
    """qemu's own messages in one line (qemu-io reports failed commands on stdout)."""
    lines: list[str] = []
    for stream in (stderr, stdout):
        for line in stream.decode(errors="replace").splitlines():
            if line.strip() and line.strip() not in lines:
                lines.append(line.strip())
    reason = "; ".join(lines) or f"exit status {returncode}"
    return reason if len(reason) <= _REASON_MAX else reason[: _REASON_MAX - 3] + "..."
