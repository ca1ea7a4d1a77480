"""The delta stream: how one recovery point's changed blocks travel to the replica.

Pure: bytes in, frames out. The primary encodes each changed extent of each
disk as a frame (:class:`DeltaEncoder`); the replica feeds whatever chunks the
network gives it to a :class:`FrameDecoder`, which verifies every frame and the
whole stream before the replica links the point into its chain. The frame
layout is written down once, in :func:`encode_frame`.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from uuid import UUID

from ferry.errors import DeltaCorruptError, FerryError, InvalidInputError, StateError, VersionError


class FrameKind(IntEnum):
    DATA = 1
    ZERO = 2
    END = 3


MAGIC = b"FRYD"
STREAM_VERSION = 1
MAX_EXTENT_BYTES = 8 * 1024**2
FLAG_COMPRESSED = 0x01

_HEAD = struct.Struct("!4sBBBB16sQHQQI32s")
_CRC = struct.Struct("!I")
HEADER_SIZE = _HEAD.size + _CRC.size
_TRAILER = struct.Struct("!QQQQ32s")

Compress = Callable[[bytes], bytes]
# (payload, the extent's length) -> data; the length lets a codec bound its output.
Decompress = Callable[[bytes, int], bytes]


@dataclass(frozen=True)
class Extent:
    """Bytes ``[offset, offset + length)`` of disk ``disk`` at the point; ``data``
    None means they read as zeros (discarded or zero-written clusters)."""

    vm_uuid: UUID
    point_id: int
    disk: int
    offset: int
    length: int
    data: bytes | None


@dataclass(frozen=True)
class DeltaEnd:
    """The end-of-delta trailer: the stream is whole and the point can be linked."""

    vm_uuid: UUID
    point_id: int
    extents: int
    data_bytes: int
    zero_bytes: int
    wire_bytes: int
    stream_sha256: bytes


def encode_frame(
    kind: FrameKind,
    *,
    vm_uuid: UUID,
    point_id: int,
    disk: int = 0,
    offset: int = 0,
    length: int = 0,
    payload: bytes = b"",
    compressed: bool = False,
) -> bytes:
    """One frame of the delta stream, header and payload.

    A delta stream carries one recovery point: every changed extent of every
    disk of one VM, then a trailer. It is a sequence of frames, each a
    90-byte header (big-endian) followed by ``payload_len`` bytes::

        off size field
          0    4 magic          b"FRYD"
          4    1 version        1 (STREAM_VERSION)
          5    1 kind           1 DATA, 2 ZERO, 3 END
          6    1 flags          bit 0: payload is zstd-compressed; others 0
          7    1 reserved       0
          8   16 vm_uuid        the VM's UUID, the same in every frame
         24    8 point_id       recovery point sequence number, the same in every frame
         32    2 disk           disk index in the VM's config (0 for END)
         34    8 offset         byte offset in the disk's delta file (0 for END)
         42    8 length         bytes of disk covered, uncompressed (0 for END)
         50    4 payload_len    bytes following the header
         54   32 payload_sha256 SHA-256 of the payload as sent
         86    4 header_crc32   CRC-32 of bytes 0..85

    DATA: the payload is the extent's bytes, zstd-compressed when flag 0 is
    set, else exactly ``length`` bytes; ``length`` is 1..MAX_EXTENT_BYTES.
    ZERO: the extent reads as zeros; no payload. END (last frame): payload
    ``!QQQQ32s`` = extent frames, DATA bytes (uncompressed), ZERO bytes,
    bytes of the stream before this frame, and the SHA-256 of those bytes.

    Why: the header CRC rejects a damaged header before its lengths are
    trusted; the payload hash rejects damaged data before it is written; the
    trailer's stream hash rejects lost, repeated or reordered frames and the
    trailer itself proves the stream was not cut short. The replica writes
    extents into a ``.partial`` file and links the point only after END.

    Compression is the adapter's: :class:`DeltaEncoder` and
    :class:`FrameDecoder` take the codec as a callable, so this module stays
    pure and tests can use any codec.
    """
    head = frame_header(kind, vm_uuid=vm_uuid, point_id=point_id, disk=disk, offset=offset,
                        length=length, payload=payload, compressed=compressed)  # fmt: skip
    return head + payload


def frame_header(kind: FrameKind, *, vm_uuid: UUID, point_id: int, disk: int, offset: int,
                 length: int, payload: bytes, compressed: bool) -> bytes:  # fmt: skip
    """The header of :func:`encode_frame`'s frame: the frame is it followed by ``payload``.

    Senders of large payloads send the two pieces one after the other instead
    of copying them into one (the stream's bytes are the same).
    """
    flags = FLAG_COMPRESSED if compressed else 0
    digest = hashlib.sha256(payload).digest()
    fields = (vm_uuid.bytes, point_id, disk, offset, length, len(payload), digest)
    head = _HEAD.pack(MAGIC, STREAM_VERSION, kind, flags, 0, *fields)
    return head + _CRC.pack(zlib.crc32(head))


class DeltaEncoder:
    """Writes one delta stream: extents in any order, then :meth:`end`.

    ``compress`` (e.g. a zstd compressor's ``compress``) is used for a DATA
    extent only when it makes it smaller; incompressible data goes raw.
    """

    def __init__(self, vm_uuid: UUID, point_id: int, *, compress: Compress | None = None) -> None:
        self.vm_uuid, self.point_id, self._compress = vm_uuid, point_id, compress
        self._hash = hashlib.sha256()
        self._wire = self._extents = self._data_bytes = self._zero_bytes = 0
        self._ended = False

    def _emit(
        self,
        kind: FrameKind,
        disk: int = 0,
        offset: int = 0,
        length: int = 0,
        payload: bytes = b"",
        *,
        compressed: bool = False,
    ) -> bytes:
        if self._ended:
            raise StateError("the delta stream has already ended")
        frame = encode_frame(
            kind,
            vm_uuid=self.vm_uuid,
            point_id=self.point_id,
            disk=disk,
            offset=offset,
            length=length,
            payload=payload,
            compressed=compressed,
        )
        self._hash.update(frame)
        self._wire += len(frame)
        return frame

    def data(self, disk: int, offset: int, data: bytes) -> bytes:
        """DATA frames for ``data`` at ``offset``, split at MAX_EXTENT_BYTES."""
        return b"".join(self.data_pieces(disk, offset, data))

    def data_pieces(self, disk: int, offset: int, data: bytes) -> list[bytes]:
        """:meth:`data` as pieces (each frame's header, then its payload), copying no payload."""
        if not data:
            raise InvalidInputError("a data extent needs at least one byte")
        if self._ended:
            raise StateError("the delta stream has already ended")
        out = []
        for start in range(0, len(data), MAX_EXTENT_BYTES):
            chunk = data[start : start + MAX_EXTENT_BYTES] if len(data) > MAX_EXTENT_BYTES else data
            packed = self._compress(chunk) if self._compress else chunk
            compressed = len(packed) < len(chunk)
            payload = packed if compressed else chunk
            head = frame_header(FrameKind.DATA, vm_uuid=self.vm_uuid, point_id=self.point_id,
                                disk=disk, offset=offset + start, length=len(chunk),
                                payload=payload, compressed=compressed)  # fmt: skip
            self._hash.update(head)
            self._hash.update(payload)
            self._wire += len(head) + len(payload)
            out += [head, payload]
            self._extents += 1
            self._data_bytes += len(chunk)
        return out

    def zero(self, disk: int, offset: int, length: int) -> bytes:
        """A ZERO frame: ``length`` bytes at ``offset`` read as zeros."""
        if length <= 0:
            raise InvalidInputError(f"a zero extent needs a positive length, got {length}")
        frame = self._emit(FrameKind.ZERO, disk, offset, length)
        self._extents += 1
        self._zero_bytes += length
        return frame

    def end(self) -> bytes:
        """The END trailer; the stream is complete after it."""
        counts = (self._extents, self._data_bytes, self._zero_bytes, self._wire)
        frame = self._emit(FrameKind.END, payload=_TRAILER.pack(*counts, self._hash.digest()))
        self._ended = True
        return frame


class FrameDecoder:
    """Reads a delta stream from byte chunks of any size.

    :meth:`feed` returns the frames completed by a chunk (:class:`Extent`, and
    :class:`DeltaEnd` last); :meth:`finish` at end of input returns the trailer
    or raises if the stream was cut short. Any fault raises
    :class:`DeltaCorruptError` (and later calls raise again): the replica
    drops the ``.partial`` file and the primary resends, its bitmap intact.
    A first frame of another stream version raises VersionError instead, as
    resending cannot cure it. ``vm_uuid``/``point_id``, when given, are what
    the replica expects; otherwise the first frame fixes them.
    """

    def __init__(
        self,
        *,
        decompress: Decompress | None = None,
        vm_uuid: UUID | None = None,
        point_id: int | None = None,
    ) -> None:
        self._decompress = decompress
        self.vm_uuid, self.point_id = vm_uuid, point_id
        self._buf = bytearray()
        self._hash = hashlib.sha256()
        self._pos = 0  # stream offset of the start of self._buf
        self._extents = self._data_bytes = self._zero_bytes = 0
        self._end: DeltaEnd | None = None
        self._error: FerryError | None = None  # once rejected, a stream stays rejected

    @property
    def bytes_received(self) -> int:
        return self._pos + len(self._buf)

    @property
    def done(self) -> bool:
        return self._end is not None

    def _reject(self, error: FerryError) -> FerryError:
        self._error = error
        return error

    def _fail(self, what: str) -> FerryError:
        return self._reject(DeltaCorruptError(f"corrupt delta stream at byte {self._pos}: {what}"))

    def _check_not_rejected(self) -> None:
        if self._error is not None:
            raise type(self._error)(self._error.message)

    def feed(self, chunk: bytes) -> list[Extent | DeltaEnd]:
        self._check_not_rejected()
        if self._end is not None and chunk:
            raise self._fail("bytes after the end-of-delta trailer")
        self._buf += chunk
        frames: list[Extent | DeltaEnd] = []
        while (frame := self._next()) is not None:
            frames.append(frame)
        if self._end is not None and self._buf:
            raise self._fail("bytes after the end-of-delta trailer")
        return frames

    def finish(self) -> DeltaEnd:
        """The trailer; raise if the input stopped before it."""
        self._check_not_rejected()
        if self._end is None:
            raise self._fail(
                f"the stream ended after {self.bytes_received} bytes, "
                "before its end-of-delta trailer (truncated)"
            )
        return self._end

    def _next(self) -> Extent | DeltaEnd | None:
        buf = self._buf
        if self._end is not None or not buf:
            return None
        if buf[: len(MAGIC)] != MAGIC[: len(buf)]:
            raise self._fail(f"bad magic {bytes(buf[:4])!r}, not a ferry delta frame")
        if self._pos == 0 and len(buf) > 4 and buf[4] != STREAM_VERSION:
            raise self._reject(
                VersionError(
                    f"the delta stream has version {buf[4]}; this ferry reads version "
                    f"{STREAM_VERSION}: upgrade the older of the two hosts"
                )
            )
        if len(buf) < HEADER_SIZE:
            return None
        head = bytes(buf[: _HEAD.size])
        if _CRC.unpack_from(buf, _HEAD.size)[0] != zlib.crc32(head):
            raise self._fail("header checksum mismatch")
        fields = _HEAD.unpack(head)
        version, kind, flags, reserved, raw_uuid, point_id = fields[1:7]
        disk, offset, length, payload_len, digest = fields[7:]
        if version != STREAM_VERSION or reserved or flags & ~FLAG_COMPRESSED:
            raise self._fail(f"bad header (version {version}, flags {flags}, reserved {reserved})")
        self._check_shape(kind, flags, disk, offset, length, payload_len)
        if len(buf) < HEADER_SIZE + payload_len:
            return None
        size = HEADER_SIZE + payload_len
        with memoryview(buf) as view:  # one copy of the payload, not three
            payload = bytes(view[HEADER_SIZE:size])
            if kind != FrameKind.END:
                self._hash.update(view[:size])
        if hashlib.sha256(payload).digest() != digest:
            raise self._fail("payload checksum mismatch")
        self._check_identity(UUID(bytes=raw_uuid), point_id)
        frame = self._frame(kind, flags, disk, offset, length, payload)
        del buf[:size]
        self._pos += size
        return frame

    def _check_shape(
        self, kind: int, flags: int, disk: int, offset: int, length: int, payload_len: int
    ) -> None:
        compressed = bool(flags & FLAG_COMPRESSED)
        if kind == FrameKind.DATA:
            ok = 0 < length <= MAX_EXTENT_BYTES and (
                payload_len < length if compressed else payload_len == length
            )
        elif kind == FrameKind.ZERO:
            ok = length > 0 and payload_len == 0 and not compressed
        elif kind == FrameKind.END:
            ok = (disk, offset, length, flags, payload_len) == (0, 0, 0, 0, _TRAILER.size)
        else:
            raise self._fail(f"unknown frame kind {kind}")
        if not ok:
            raise self._fail(
                f"impossible {FrameKind(kind).name} frame (length {length}, "
                f"payload {payload_len}, flags {flags})"
            )

    def _check_identity(self, vm_uuid: UUID, point_id: int) -> None:
        if self.vm_uuid is None:
            self.vm_uuid = vm_uuid
        if self.point_id is None:
            self.point_id = point_id
        if (vm_uuid, point_id) != (self.vm_uuid, self.point_id):
            raise self._fail(
                f"frame of VM {vm_uuid} point {point_id} in the stream of "
                f"VM {self.vm_uuid} point {self.point_id}"
            )

    def _frame(
        self, kind: int, flags: int, disk: int, offset: int, length: int, payload: bytes
    ) -> Extent | DeltaEnd:
        assert self.vm_uuid is not None and self.point_id is not None
        if kind == FrameKind.END:
            return self._trailer(payload)
        self._extents += 1
        if kind == FrameKind.ZERO:
            self._zero_bytes += length
            return Extent(self.vm_uuid, self.point_id, disk, offset, length, None)
        data = payload
        if flags & FLAG_COMPRESSED:
            data = self._inflate(payload, length)
        self._data_bytes += length
        return Extent(self.vm_uuid, self.point_id, disk, offset, length, data)

    def _inflate(self, payload: bytes, length: int) -> bytes:
        if self._decompress is None:
            raise self._reject(
                VersionError("the delta stream is compressed and this receiver has no decompressor")
            )
        try:
            data = self._decompress(payload, length)
        except Exception as exc:  # the codec is foreign: any failure means bad input
            raise self._fail(f"payload does not decompress ({exc})") from exc
        if len(data) != length:
            raise self._fail(f"payload decompresses to {len(data)} bytes, not {length}")
        return data

    def _trailer(self, payload: bytes) -> DeltaEnd:
        assert self.vm_uuid is not None and self.point_id is not None
        extents, data_bytes, zero_bytes, wire, digest = _TRAILER.unpack(payload)
        seen = (self._extents, self._data_bytes, self._zero_bytes, self._pos)
        if (extents, data_bytes, zero_bytes, wire) != seen:
            raise self._fail(
                f"trailer counts {extents} extents, {data_bytes}+{zero_bytes} bytes in "
                f"{wire} stream bytes; received {seen[0]}, {seen[1]}+{seen[2]} in {seen[3]}"
            )
        if digest != self._hash.digest():
            raise self._fail("whole-stream checksum mismatch")
        self._end = DeltaEnd(
            self.vm_uuid, self.point_id, extents, data_bytes, zero_bytes, wire, digest
        )
        return self._end
