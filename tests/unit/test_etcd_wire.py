"""etcd's JSON gateway encoding: prefixes as ranges, entries with zero fields left out, refusals."""

from __future__ import annotations

import pytest

from ferry.adapters import etcd_wire as wire
from ferry.core.cluster.store import Compare, Delete, Entry, Put, Target
from ferry.errors import InvalidInputError


@pytest.mark.parametrize(
    ("prefix", "end"),
    [(b"/a/", b"/a0"), (b"a", b"b"), (b"a\xff", b"b"), (b"a\xff\xff", b"b"), (b"\xff", b"\0")],
)
def test_a_prefix_ends_after_its_last_byte_plus_one(prefix: bytes, end: bytes) -> None:
    assert wire.prefix_end(prefix) == end


def test_key_ranges() -> None:
    assert wire.key_range("/k", False) == {"key": wire.b64(b"/k")}
    assert wire.key_range("/a/", True) == {"key": wire.b64(b"/a/"), "range_end": wire.b64(b"/a0")}
    everything = wire.b64(b"\0")
    assert wire.key_range("", True) == {"key": everything, "range_end": everything}


def test_an_entry_reads_missing_fields_as_zero() -> None:
    assert wire.entry({"key": wire.b64(b"/x"), "mod_revision": "7"}) == Entry("/x", b"", 0, 7, 0)
    full = {"key": wire.b64(b"/x"), "value": wire.b64(b"v"), "create_revision": "3",
            "mod_revision": "9", "version": "2", "lease": "7587884723543000001"}  # fmt: skip
    assert wire.entry(full) == Entry("/x", b"v", 3, 9, 2, 7587884723543000001)


def test_compares_and_ops() -> None:
    expected = {"key": wire.b64(b"/o"), "result": "EQUAL", "target": "MOD", "mod_revision": "5"}
    assert wire.compare(Compare.unchanged("/o", 5)) == expected
    assert wire.compare(Compare.absent("/o"))["create_revision"] == "0"
    assert wire.compare(Compare.holds("/o", b"n1"))["value"] == wire.b64(b"n1")
    with pytest.raises(InvalidInputError):
        wire.compare(Compare("/o", Target.MOD, b"not a revision"))
    assert "lease" not in wire.op(Put("/k", b"v"))["request_put"]
    assert wire.op(Put("/k", b"v", lease=12))["request_put"]["lease"] == "12"
    assert wire.op(Delete("/p/", prefix=True))["request_delete_range"]["range_end"] == wire.b64(
        b"/p0"
    )


def test_refusals_in_unary_and_stream_form() -> None:
    assert wire.refusal({"header": {}}) is None
    unary = {"error": "etcdserver: requested lease not found", "code": 5,
             "message": "etcdserver: requested lease not found"}  # fmt: skip
    assert wire.refusal(unary) == (5, "etcdserver: requested lease not found")
    stream = {"error": {"grpc_code": 14, "http_code": 503, "message": "no leader"}}
    assert wire.refusal(stream) == (14, "no leader")
