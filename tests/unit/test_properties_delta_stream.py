"""Property tests of the delta stream decoder: hostile bytes never crash it.

Whatever arrives (random bytes, a valid stream cut anywhere, a valid stream
with one byte changed), the decoder either yields exactly what was sent or
raises one of its own errors: DeltaCorruptError (the primary resends), or
VersionError (an incompatible sender). Nothing else escapes, and no damaged
stream ever ends as a whole point.
"""

from __future__ import annotations

from uuid import UUID

import zstandard
from hypothesis import given
from hypothesis import strategies as st

from ferry.core.delta_stream import (
    HEADER_SIZE,
    MAGIC,
    DeltaEncoder,
    Extent,
    FrameDecoder,
    FrameKind,
    encode_frame,
)
from ferry.errors import DeltaCorruptError, VersionError
from tests.unit.strategies import fast

FAST = fast(50)
VM = UUID("6b3b3f0e-2d39-4a2b-9a53-0d5a8f1c2e11")
OWN_ERRORS = (DeltaCorruptError, VersionError)


def _compress(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=1).compress(data)


def _decompress(payload: bytes, size: int) -> bytes:
    return zstandard.ZstdDecompressor().decompress(payload, max_output_size=size)


# One extent: (disk, offset, data or a zero length).
extents = st.lists(
    st.tuples(
        st.integers(0, 3),
        st.integers(0, 2**40),
        st.one_of(
            st.binary(min_size=1, max_size=600),
            st.integers(1, 2**30),  # a zero extent of this length
            st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=4), st.integers(1, 300)),
        ),
    ),
    max_size=8,
)


def _stream(items: list[tuple[int, int, bytes | int]], compress: bool) -> bytes:
    encoder = DeltaEncoder(VM, 7, compress=_compress if compress else None)
    parts = [encoder.data(d, o, x) if isinstance(x, bytes) else encoder.zero(d, o, x)
             for d, o, x in items]  # fmt: skip
    return b"".join(parts) + encoder.end()


def _decode(stream: bytes, cuts: list[int]) -> tuple[list[Extent], FrameDecoder]:
    decoder = FrameDecoder(decompress=_decompress, vm_uuid=VM, point_id=7)
    got: list[Extent] = []
    start = 0
    for cut in [*sorted({min(c, len(stream)) for c in cuts}), len(stream)]:
        got += [f for f in decoder.feed(stream[start:cut]) if isinstance(f, Extent)]
        start = cut
    decoder.finish()
    return got, decoder


@FAST
@given(extents, st.booleans(), st.lists(st.integers(0, 20_000), max_size=6))
def test_round_trip_in_any_chunking(items: list[tuple[int, int, bytes | int]], compress: bool,
                                    cuts: list[int]) -> None:  # fmt: skip
    stream = _stream(items, compress)
    got, decoder = _decode(stream, cuts)
    want = [(d, o, len(x), x) if isinstance(x, bytes) else (d, o, x, None) for d, o, x in items]
    assert [(e.disk, e.offset, e.length, e.data) for e in got] == want
    end = decoder.finish()
    assert end.extents == len(items) and end.wire_bytes + HEADER_SIZE + 64 == len(stream)
    assert decoder.done and decoder.bytes_received == len(stream)


def _only_own_errors(data: bytes, cuts: list[int]) -> None:
    try:
        _decode(data, cuts)
    except OWN_ERRORS:
        return
    raise AssertionError("a stream that was not a valid one was accepted")


@FAST
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=4))
def test_arbitrary_bytes_raise_only_the_decoders_errors(data: bytes, cuts: list[int]) -> None:
    _only_own_errors(data, cuts)


@FAST
@given(st.binary(max_size=300), st.sampled_from([FrameKind.DATA, FrameKind.ZERO, FrameKind.END]))
def test_well_framed_garbage_raises_only_the_decoders_errors(tail: bytes, kind: FrameKind) -> None:
    """A valid header (checksums right) with nonsense inside gets past the first checks."""
    frame = encode_frame(kind, vm_uuid=VM, point_id=7, length=len(tail) or 1, payload=tail,
                         compressed=bool(tail) and kind is FrameKind.DATA)  # fmt: skip
    _only_own_errors(frame + tail, [])
    _only_own_errors(MAGIC + tail, [])


@FAST
@given(extents, st.booleans(), st.data())
def test_a_cut_stream_never_ends_as_a_point(
    items: list[tuple[int, int, bytes | int]], compress: bool, data: st.DataObject
) -> None:
    stream = _stream(items, compress)
    cut = data.draw(st.integers(0, len(stream) - 1), label="cut")
    decoder = FrameDecoder(decompress=_decompress, vm_uuid=VM, point_id=7)
    try:
        decoder.feed(stream[:cut])
        decoder.finish()
    except DeltaCorruptError as exc:
        assert "truncated" in str(exc) or cut == 0 or "corrupt" in str(exc)
    else:
        raise AssertionError(f"a stream cut at {cut} of {len(stream)} bytes was accepted")


@FAST
@given(extents, st.booleans(), st.data())
def test_every_changed_byte_is_detected(items: list[tuple[int, int, bytes | int]],
                                        compress: bool, data: st.DataObject) -> None:  # fmt: skip
    stream = bytearray(_stream(items, compress))
    where = data.draw(st.integers(0, len(stream) - 1), label="where")
    stream[where] ^= data.draw(st.integers(1, 255), label="xor")
    _only_own_errors(bytes(stream), data.draw(st.lists(st.integers(0, len(stream)), max_size=3)))


@FAST
@given(extents, st.integers(0, 1000))
def test_bytes_after_the_end_are_refused(items: list[tuple[int, int, bytes | int]],
                                         extra: int) -> None:  # fmt: skip
    stream = _stream(items, False) + b"\0" * (extra + 1)
    _only_own_errors(stream, [len(stream) - extra - 1])
