"""The delta stream wire format: round trips and every way a stream can arrive broken."""

import hashlib
import random
import struct
import zlib
from uuid import UUID

import pytest

from ferry.core.delta_stream import (
    HEADER_SIZE,
    MAGIC,
    MAX_EXTENT_BYTES,
    DeltaEncoder,
    DeltaEnd,
    Extent,
    FrameDecoder,
    FrameKind,
    encode_frame,
)
from ferry.errors import DeltaCorruptError, FerryError, InvalidInputError, StateError, VersionError

VM = UUID("12345678-1234-5678-1234-567812345678")
OTHER = UUID("87654321-4321-8765-4321-876543218765")


def inflate(payload: bytes, size: int) -> bytes:
    return zlib.decompress(payload)


def sample_stream(compress: bool = True) -> tuple[list[bytes], list[Extent]]:
    """Frames of one point and the extents they carry."""
    rng = random.Random(7)
    noise = rng.randbytes(3000)
    enc = DeltaEncoder(VM, 42, compress=zlib.compress if compress else None)
    frames = [
        enc.data(0, 65536, b"\x22" * 4096),
        enc.data(1, 0, noise),
        enc.zero(0, 1 << 20, 65536),
        enc.data(0, 0, b"ferry" * 100),
        enc.end(),
    ]
    extents = [
        Extent(VM, 42, 0, 65536, 4096, b"\x22" * 4096),
        Extent(VM, 42, 1, 0, 3000, noise),
        Extent(VM, 42, 0, 1 << 20, 65536, None),
        Extent(VM, 42, 0, 0, 500, b"ferry" * 100),
    ]
    return frames, extents


def decode(
    stream: bytes,
    sizes: list[int] | None = None,
    *,
    vm_uuid: UUID | None = None,
    point_id: int | None = None,
) -> list[Extent | DeltaEnd]:
    decoder = FrameDecoder(decompress=inflate, vm_uuid=vm_uuid, point_id=point_id)
    out: list[Extent | DeltaEnd] = []
    pos = 0
    for size in sizes or [len(stream)]:
        out += decoder.feed(stream[pos : pos + size])
        pos += size
    out += decoder.feed(stream[pos:])
    end = decoder.finish()
    assert out[-1] is end and decoder.done
    assert decoder.bytes_received == len(stream)
    return out


def reseal(frame: bytes) -> bytes:
    """Recompute a frame's header CRC after tampering with its header."""
    head = frame[: HEADER_SIZE - 4]
    return head + struct.pack("!I", zlib.crc32(head)) + frame[HEADER_SIZE:]


def test_a_delta_round_trips() -> None:
    frames, extents = sample_stream()
    stream = b"".join(frames)
    out = decode(stream)
    assert out[:-1] == extents
    end = out[-1]
    assert isinstance(end, DeltaEnd)
    assert (end.vm_uuid, end.point_id, end.extents) == (VM, 42, 4)
    assert (end.data_bytes, end.zero_bytes) == (4096 + 3000 + 500, 65536)
    assert end.wire_bytes == len(stream) - len(frames[-1])
    assert end.stream_sha256 == hashlib.sha256(stream[: end.wire_bytes]).digest()


@pytest.mark.parametrize("split", [1, 2, 3, 5, 89, 90, 91, 1000, 4096])
def test_any_chunking_gives_the_same_frames(split: int) -> None:
    frames, extents = sample_stream()
    stream = b"".join(frames)
    assert decode(stream, [split] * (len(stream) // split))[:-1] == extents


def test_random_chunkings_give_the_same_frames() -> None:
    frames, extents = sample_stream()
    stream = b"".join(frames)
    rng = random.Random(11)
    for _ in range(50):
        sizes = [rng.randint(0, 300) for _ in range(40)]
        assert decode(stream, sizes)[:-1] == extents


def test_compression_is_used_only_when_it_pays() -> None:
    frames, _ = sample_stream()
    flags = [frame[6] for frame in frames]
    assert flags == [1, 0, 0, 1, 0]  # random bytes go raw, zero and END never compress
    raw_frames, extents = sample_stream(compress=False)
    assert {f[6] for f in raw_frames} == {0}
    assert decode(b"".join(raw_frames))[:-1] == extents


def test_the_header_layout_is_the_documented_one() -> None:
    payload = b"abc"
    frame = encode_frame(
        FrameKind.DATA, vm_uuid=VM, point_id=7, disk=2, offset=9, length=3, payload=payload
    )
    assert HEADER_SIZE == 90 and len(frame) == 93
    assert frame[0:4] == MAGIC and frame[4] == 1 and frame[5] == 1 and frame[6:8] == b"\0\0"
    assert frame[8:24] == VM.bytes
    assert struct.unpack_from("!QHQQI", frame, 24) == (7, 2, 9, 3, 3)
    assert frame[54:86] == hashlib.sha256(payload).digest()
    assert struct.unpack_from("!I", frame, 86)[0] == zlib.crc32(frame[:86])
    assert frame[90:] == payload


def test_an_empty_delta_is_a_valid_point() -> None:
    out = decode(DeltaEncoder(VM, 1).end())
    assert out == [DeltaEnd(VM, 1, 0, 0, 0, 0, hashlib.sha256().digest())]


def test_large_extents_are_split() -> None:
    enc = DeltaEncoder(VM, 1)
    data = bytes(range(256)) * (MAX_EXTENT_BYTES // 256) + b"tail"
    stream = enc.data(3, 4096, data) + enc.end()
    out = decode(stream)
    assert [(e.offset, e.length) for e in out if isinstance(e, Extent)] == [
        (4096, MAX_EXTENT_BYTES),
        (4096 + MAX_EXTENT_BYTES, 4),
    ]


def test_every_corrupted_byte_is_detected() -> None:
    frames, _ = sample_stream()
    stream = b"".join(frames)
    for i in range(len(stream)):
        damaged = bytearray(stream)
        damaged[i] ^= 0x40
        expected = VersionError if i == 4 else DeltaCorruptError
        with pytest.raises(expected):
            decode(bytes(damaged))


def test_every_truncation_is_detected() -> None:
    frames, _ = sample_stream()
    stream = b"".join(frames)
    for cut in range(len(stream)):
        decoder = FrameDecoder(decompress=inflate)
        decoder.feed(stream[:cut])  # a prefix is not an error yet
        with pytest.raises(DeltaCorruptError) as info:
            decoder.finish()
        assert f"the stream ended after {cut} bytes" in str(info.value)
        assert "truncated" in str(info.value)


def test_a_wrong_magic_is_refused_at_its_first_byte() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"FR")
    with pytest.raises(DeltaCorruptError, match=r"at byte 0: bad magic b'FRX', not a ferry"):
        decoder.feed(b"X")
    with pytest.raises(DeltaCorruptError, match="bad magic"):
        decoder.feed(b"")  # a rejected stream stays rejected


def test_another_stream_version_is_a_version_error() -> None:
    frame = bytearray(DeltaEncoder(VM, 1).end())
    frame[4] = 2
    decoder = FrameDecoder()
    with pytest.raises(VersionError) as info:
        decoder.feed(bytes(frame[:5]))
    assert str(info.value) == (
        "the delta stream has version 2; this ferry reads version 1: "
        "upgrade the older of the two hosts"
    )
    with pytest.raises(VersionError, match="has version 2"):
        decoder.finish()
    # after the first frame a version change is damage, even with a valid CRC
    frames, _ = sample_stream()
    later = bytearray(frames[1])
    later[4] = 2
    with pytest.raises(DeltaCorruptError, match="bad header"):
        decode(frames[0] + reseal(bytes(later)) + b"".join(frames[2:]))


def test_a_payload_that_fails_its_checksum_is_refused() -> None:
    frames, _ = sample_stream()
    damaged = bytearray(frames[1])
    damaged[-1] ^= 1
    decoder = FrameDecoder(decompress=inflate)
    decoder.feed(frames[0])
    with pytest.raises(DeltaCorruptError) as info:
        decoder.feed(bytes(damaged))
    assert str(info.value) == (
        f"corrupt delta stream at byte {len(frames[0])}: payload checksum mismatch"
    )


def test_lost_repeated_and_reordered_frames_are_refused() -> None:
    frames, _ = sample_stream()
    body, end = frames[:-1], frames[-1]
    with pytest.raises(DeltaCorruptError, match="trailer counts 4 extents"):
        decode(b"".join(body[:2] + body[3:]) + end)
    with pytest.raises(DeltaCorruptError, match="trailer counts 4 extents"):
        decode(b"".join([*body, body[0]]) + end)
    with pytest.raises(DeltaCorruptError, match="whole-stream checksum mismatch"):
        decode(b"".join([body[1], body[0], *body[2:]]) + end)


def test_a_resealed_frame_with_other_data_fails_the_stream_hash() -> None:
    frames, _ = sample_stream(compress=False)
    forged = bytearray(frames[1])
    forged[HEADER_SIZE] ^= 1
    payload = bytes(forged[HEADER_SIZE:])
    forged[54:86] = hashlib.sha256(payload).digest()
    stream = frames[0] + reseal(bytes(forged)) + b"".join(frames[2:])
    with pytest.raises(DeltaCorruptError, match="whole-stream checksum mismatch"):
        decode(stream)


def test_frames_of_another_vm_or_point_are_refused() -> None:
    frames, _ = sample_stream()
    stranger = DeltaEncoder(OTHER, 42).data(0, 0, b"x")
    with pytest.raises(DeltaCorruptError, match=f"frame of VM {OTHER} point 42 in the stream of"):
        decode(frames[0] + stranger + b"".join(frames[1:]))
    with pytest.raises(DeltaCorruptError, match=f"frame of VM {VM} point 42 in the stream of VM"):
        decode(b"".join(frames), point_id=41)
    with pytest.raises(DeltaCorruptError, match="in the stream of VM"):
        decode(b"".join(frames), vm_uuid=OTHER)
    assert decode(b"".join(frames), vm_uuid=VM, point_id=42)[-1]


def test_bytes_after_the_trailer_are_refused() -> None:
    frames, _ = sample_stream()
    stream = b"".join(frames)
    with pytest.raises(DeltaCorruptError, match="bytes after the end-of-delta trailer"):
        FrameDecoder(decompress=inflate).feed(stream + b"F")
    decoder = FrameDecoder(decompress=inflate)
    decoder.feed(stream)
    decoder.feed(b"")
    with pytest.raises(DeltaCorruptError, match="bytes after the end-of-delta trailer"):
        decoder.feed(frames[0])


def test_impossible_frames_are_refused() -> None:
    data = encode_frame(FrameKind.DATA, vm_uuid=VM, point_id=1, length=10, payload=b"short")
    with pytest.raises(DeltaCorruptError, match="impossible DATA frame"):
        FrameDecoder().feed(data)
    zero = encode_frame(FrameKind.ZERO, vm_uuid=VM, point_id=1, length=0)
    with pytest.raises(DeltaCorruptError, match="impossible ZERO frame"):
        FrameDecoder().feed(zero)
    huge = encode_frame(FrameKind.DATA, vm_uuid=VM, point_id=1, length=MAX_EXTENT_BYTES + 1)
    with pytest.raises(DeltaCorruptError, match="impossible DATA frame"):
        FrameDecoder().feed(huge)  # refused before waiting for 8 MiB of payload
    unknown = bytearray(encode_frame(FrameKind.ZERO, vm_uuid=VM, point_id=1, length=1))
    unknown[5] = 9
    with pytest.raises(DeltaCorruptError, match="unknown frame kind 9"):
        FrameDecoder().feed(reseal(bytes(unknown)))


def test_compressed_frames_need_a_working_decompressor() -> None:
    frames, _ = sample_stream()
    with pytest.raises(VersionError, match="compressed and this receiver has no decompressor"):
        FrameDecoder().feed(frames[0])

    def liar(payload: bytes, size: int) -> bytes:
        return b"\0" * (size - 1)

    with pytest.raises(DeltaCorruptError, match="decompresses to 4095 bytes, not 4096"):
        FrameDecoder(decompress=liar).feed(frames[0])

    def broken(payload: bytes, size: int) -> bytes:
        raise zlib.error("invalid block")

    with pytest.raises(DeltaCorruptError, match=r"does not decompress \(invalid block\)") as info:
        FrameDecoder(decompress=broken).feed(frames[0])
    assert isinstance(info.value.__cause__, zlib.error)


def test_the_encoder_refuses_empty_extents_and_writing_after_the_end() -> None:
    enc = DeltaEncoder(VM, 1)
    with pytest.raises(InvalidInputError, match="at least one byte"):
        enc.data(0, 0, b"")
    with pytest.raises(InvalidInputError, match="positive length"):
        enc.zero(0, 0, 0)
    enc.end()
    with pytest.raises(StateError, match="already ended"):
        enc.zero(0, 0, 1)


def test_stream_errors_are_ferry_errors_with_their_own_code() -> None:
    assert issubclass(DeltaCorruptError, FerryError)
    assert DeltaCorruptError.code == "delta-corrupt"
