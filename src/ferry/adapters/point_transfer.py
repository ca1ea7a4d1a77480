"""Moving recovery points: delta files out of the primary, into the replica's chain.

A cycle's delta is a qcow2 overlay file (see :mod:`ferry.adapters.cbt`). It
travels as a delta stream (:mod:`ferry.core.delta_stream`) whose extents are
the *file's* allocated byte ranges (holes of the sparse file travel as ZERO
frames), zstd-compressed where that pays. The replica writes the extents into
``<point>.partial``, and only when the trailer verified the whole stream does
it check the image (``qemu-img check``), point it at the previous recovery
point (``qemu-img rebase -u``), fsync it and rename it into place: a point is
either whole or absent. Retention merges follow :class:`ferry.core.replication.Merge`.
OS errors become FerryErrors here, naming the file.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from uuid import UUID

import zstandard

from ferry.adapters import qemu_img
from ferry.adapters.durable import fsync_dir, fsync_file
from ferry.adapters.os_errors import os_errors
from ferry.core.delta_stream import DeltaEncoder, DeltaEnd, Extent, FrameDecoder
from ferry.core.replication import Merge, Thin
from ferry.errors import DeltaCorruptError

CHUNK = 4 * 1024 * 1024
FEED_BATCH = 1024 * 1024
_ZSTD_LEVEL = 1  # the cycle's speed matters more than the last few per cent of ratio
_PROBE = 64 * 1024
_PROBE_RATIO = 0.9


def _compress(data: bytes) -> bytes:
    """zstd, unless a 64 KiB sample shows the data does not compress (then ``data`` itself).

    Random or already compressed guest data would cost zstd a full pass for
    nothing; the encoder sends a frame raw when "compressed" is not smaller.
    """
    compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    if len(data) > 2 * _PROBE:
        middle = len(data) // 2
        sample = data[middle : middle + _PROBE]
        if len(compressor.compress(sample)) > _PROBE_RATIO * len(sample):
            return data
    return compressor.compress(data)


def _decompress(payload: bytes, size: int) -> bytes:
    return zstandard.ZstdDecompressor().decompress(payload, max_output_size=size)


def _file_extents(path: Path) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, has_data) covering the whole file, holes included."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        fd = handle.fileno()
        offset = 0
        while offset < size:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # no data after offset: the rest is a hole
                yield offset, size - offset, False
                return
            if data > offset:
                yield offset, data - offset, False
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            yield data, hole - data, True
            offset = hole


def encode_point(files: list[Path], *, vm_uuid: UUID, point_id: int,
                 compress: bool = True) -> Iterator[bytes]:  # fmt: skip
    """The delta stream of one recovery point (one delta file per disk)."""
    encoder = DeltaEncoder(vm_uuid, point_id, compress=_compress if compress else None)
    for disk, path in enumerate(files):
        with os_errors(f"cannot read delta file {path}"), path.open("rb") as handle:
            for offset, length, has_data in _file_extents(path):
                if not has_data:
                    yield encoder.zero(disk, offset, length)
                    continue
                handle.seek(offset)
                done = 0
                while done < length:
                    chunk = handle.read(min(CHUNK, length - done))
                    yield from encoder.data_pieces(disk, offset + done, chunk)
                    done += len(chunk)
    yield encoder.end()


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy a file, leaving its holes holes (qcow2 deltas are mostly holes)."""
    with os_errors(f"cannot copy {src} to {dst}"):
        _copy_sparse(src, dst)


def _copy_sparse(src: Path, dst: Path) -> None:
    size = src.stat().st_size
    with src.open("rb") as source, dst.open("wb") as out:
        for offset, length, has_data in _file_extents(src):
            if not has_data:
                continue
            source.seek(offset)
            out.seek(offset)
            done = 0
            while done < length:
                chunk = source.read(min(CHUNK, length - done))
                out.write(chunk)
                done += len(chunk)
        out.truncate(size)


async def combine_overlays(overlays: list[Path], below: Path, out: Path, *,
                           qemu_img_bin: str = "qemu-img") -> None:  # fmt: skip
    """One overlay on ``below`` that reads like the top of ``overlays`` (oldest first).

    Extended replication sends the changes of several recovery points as one.
    The sources are never written: the oldest is copied to ``out`` and pointed
    at ``below``; every later one is copied next to it, pointed at ``out`` and
    committed into it, so ``out`` ends up holding each cluster any of them
    holds, with the newest data (zeroed clusters included).
    """
    await asyncio.to_thread(copy_sparse, overlays[0], out)
    await qemu_img.rebase_unsafe(out, below, qemu_img=qemu_img_bin)
    for overlay in overlays[1:]:
        step = out.with_name(out.name + ".next")
        await asyncio.to_thread(copy_sparse, overlay, step)
        try:
            await qemu_img.rebase_unsafe(step, out, qemu_img=qemu_img_bin)
            await qemu_img.commit(step, qemu_img=qemu_img_bin)
        finally:
            step.unlink(missing_ok=True)
    await asyncio.to_thread(fsync_file, out)


class PointReceiver:
    """Writes one incoming recovery point into ``.partial`` files, then links it."""

    def __init__(self, targets: list[Path], *, vm_uuid: UUID, point_id: int,
                 qemu_img_bin: str = "qemu-img") -> None:  # fmt: skip
        self.targets = targets
        self.partials = [t.with_name(t.name + ".partial") for t in targets]
        self.qemu_img = qemu_img_bin
        self._decoder = FrameDecoder(decompress=_decompress, vm_uuid=vm_uuid, point_id=point_id)
        self.commit_s = 0.0  # seconds commit() took (check, rebase, fsync, rename)
        with os_errors(f"cannot create recovery point files in {targets[0].parent}"):
            self._files = [p.open("wb") for p in self.partials]

    def feed(self, chunk: bytes) -> None:
        for item in self._decoder.feed(chunk):
            if isinstance(item, Extent):
                if item.disk >= len(self._files):
                    raise DeltaCorruptError(f"the stream names disk {item.disk}, the VM has "
                                            f"{len(self._files)}")  # fmt: skip
                handle = self._files[item.disk]
                with os_errors(f"cannot write recovery point file {self.partials[item.disk]}"):
                    if item.data is None:  # a hole: leave it sparse
                        handle.truncate(max(handle.seek(0, 2), item.offset + item.length))
                    else:
                        handle.seek(item.offset)
                        handle.write(item.data)

    def abandon(self) -> None:
        for handle in self._files:
            handle.close()
        for partial in self.partials:
            partial.unlink(missing_ok=True)

    async def commit(self, backings: list[Path | None]) -> DeltaEnd:
        """Verify the whole stream and the images, then link them in. All or nothing."""
        started = time.monotonic()
        try:
            end = self._decoder.finish()
            with os_errors(f"cannot write recovery point files in {self.targets[0].parent}"):
                for handle in self._files:
                    handle.close()
            # Only the new overlay is checked (the chain below was checked as it
            # arrived), and each file is fsynced once, after its header points
            # at the chain: that covers the extents written before it, too.
            for partial, backing in zip(self.partials, backings, strict=True):
                await qemu_img.check(partial, qemu_img=self.qemu_img)
                if backing is not None:
                    await qemu_img.rebase_unsafe(partial, backing, qemu_img=self.qemu_img)
                await asyncio.to_thread(fsync_file, partial)
        except BaseException:
            self.abandon()
            raise
        for partial, target in zip(self.partials, self.targets, strict=True):
            with os_errors(f"cannot link recovery point file {target}"):
                partial.rename(target)
        fsync_dir(self.targets[0].parent)
        self.commit_s = time.monotonic() - started
        return end


async def receive_point(stream: AsyncIterator[bytes], receiver: PointReceiver,
                        backings: list[Path | None]) -> DeltaEnd:  # fmt: skip
    """Feed a whole stream to ``receiver``; on any failure nothing is linked."""
    # Chunks are gathered into batches that a thread verifies and writes
    # while the next batch arrives (hashing and writing off the event loop).
    fed: asyncio.Future[None] | None = None
    batch: list[bytes] = []
    size = 0
    try:
        async for chunk in stream:
            batch.append(chunk)
            size += len(chunk)
            if size >= FEED_BATCH:
                if fed is not None:
                    await fed
                fed = asyncio.ensure_future(asyncio.to_thread(receiver.feed, b"".join(batch)))
                batch, size = [], 0
        if fed is not None:
            await fed
        if batch:
            await asyncio.to_thread(receiver.feed, b"".join(batch))
    except BaseException:
        if fed is not None and not fed.done():
            await asyncio.wait([fed])  # its thread writes the files abandon() removes
        receiver.abandon()
        raise
    return await receiver.commit(backings)


async def apply_merge(merge: Merge, root: Path, *, qemu_img_bin: str = "qemu-img") -> None:
    """Run one retention step (the catalog steps are the caller's)."""
    overlay = root / merge.overlay.file
    await qemu_img.commit(overlay, qemu_img=qemu_img_bin)
    if merge.rebase is not None:
        await qemu_img.rebase_unsafe(root / merge.rebase.file, root / merge.base_file,
                                     qemu_img=qemu_img_bin)  # fmt: skip
    await asyncio.to_thread(fsync_file, root / merge.base_file)
    with os_errors(f"cannot delete the merged overlay {overlay}"):
        await asyncio.to_thread(overlay.unlink)


async def apply_thin(thin: Thin, root: Path, *, qemu_img_bin: str = "qemu-img") -> None:
    """Step 1 of a thinning step: the point after the dropped one no longer needs it.

    The caller then drops the point from the catalog and deletes its file
    (:func:`delete_point_file`).
    """
    target = root / thin.rebase.file
    await qemu_img.rebase(target, root / thin.onto.file, qemu_img=qemu_img_bin)
    await asyncio.to_thread(fsync_file, target)


async def delete_point_file(path: Path) -> None:
    with os_errors(f"cannot delete the thinned point file {path}"):
        await asyncio.to_thread(path.unlink, True)
