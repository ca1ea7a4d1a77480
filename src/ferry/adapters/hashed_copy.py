"""Copy a file and take its SHA-256 in the same pass: the export's and import's data path.

Export and import used to copy a disk (``qemu-img convert``) and then read
it again to hash it (an export: the copy; an import: the folder's file,
before converting it), so every byte was read twice and hashed on the one
core that also copied. :func:`copy_hashed` reads each piece once: the
writer (this thread) writes piece *n* while a second thread hashes it
(``hashlib`` and ``os.pwrite`` both let go of the GIL), then reads piece
*n + 1*. The copy is sparse: the source's holes (``SEEK_HOLE``) and any
piece that reads as zeroes are not written, so they stay holes; the hash
covers them as the zeroes they read as, so it is the hash of the file's
content, as :func:`sha256_file` computes it.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ferry.errors import FerryError

PIECE = 8 * 1024 * 1024
_ZEROES = bytes(PIECE)

Progress = Callable[[int], None]


def sha256_file(path: Path, on_bytes: Progress | None = None) -> str:
    """The SHA-256 of ``path``'s content; ``on_bytes`` hears how much was read."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(PIECE):
            digest.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return digest.hexdigest()


def _extents(fd: int, size: int) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, is_data) runs covering ``0..size``, holes by SEEK_HOLE."""
    offset = 0
    while offset < size:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: only a hole up to the end
                raise
            data = size
        if data > offset:
            yield offset, data - offset, False
        if data >= size:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        yield data, hole - data, True
        offset = hole


def _hash_zeroes(digest: hashlib._Hash, length: int) -> None:
    while length > 0:
        step = min(length, PIECE)
        digest.update(_ZEROES[:step] if step < PIECE else _ZEROES)
        length -= step


def copy_hashed(src: Path, dst: Path, on_bytes: Progress | None = None) -> str:
    """Copy ``src`` to a new sparse file ``dst``; the SHA-256 of ``src``'s content.

    ``dst`` must not exist. ``on_bytes`` hears the bytes of ``src`` done so far
    (holes included). Nothing is fsynced: the caller decides when it must be.
    """
    digest = hashlib.sha256()
    try:
        source = os.open(src, os.O_RDONLY)
    except OSError as exc:
        raise FerryError(f"cannot read {src}: {exc.strerror}") from None
    # Two buffers: one is hashed while the other is filled and written.
    buffers = [bytearray(PIECE), bytearray(PIECE)]
    hashed: list[Future[None] | None] = [None, None]
    turn = 0
    try:
        size = os.fstat(source).st_size
        target = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="hash") as hasher:
                for offset, length, is_data in _extents(source, size):
                    if not is_data:  # FIFO: hashed after every piece before it
                        hasher.submit(_hash_zeroes, digest, length)
                        if on_bytes is not None:
                            on_bytes(length)
                        continue
                    end = offset + length
                    while offset < end:
                        pending = hashed[turn]
                        if pending is not None:
                            pending.result()  # this buffer's last piece is hashed
                        view = memoryview(buffers[turn])[: min(PIECE, end - offset)]
                        got = os.preadv(source, [view], offset)
                        if got == 0:
                            raise FerryError(f"{src} changed size while it was copied")
                        piece = view[:got]
                        hashed[turn] = hasher.submit(digest.update, piece)
                        full = buffers[turn] if got == PIECE else buffers[turn][:got]
                        if full != (_ZEROES if got == PIECE else _ZEROES[:got]):  # memcmp
                            os.pwrite(target, piece, offset)
                        offset += got
                        turn = 1 - turn
                        if on_bytes is not None:
                            on_bytes(got)
                for pending in hashed:
                    if pending is not None:
                        pending.result()
            os.ftruncate(target, size)
        finally:
            os.close(target)
    finally:
        os.close(source)
    return digest.hexdigest()
