"""etcd v3's JSON gateway, the wire format: what :mod:`ferry.adapters.etcd` sends and reads.

As etcd 3.4 speaks it:

- every call is ``POST /v3/<service>/<method>`` with a JSON body; keys and
  values are base64; int64 fields (revisions, lease ids, TTLs, counts) travel
  as decimal strings; a field at its zero value is left out (0, false, "").
- a prefix is the range ``[key, range_end)`` where ``range_end`` is the prefix
  with its last byte plus one; ``"\\0"``/``"\\0"`` is every key.
- refusals come back as ``{"error", "message", "code"}`` (a gRPC code: 5 =
  not found, for a lease that is gone; 3 = invalid argument).
- ``/v3/lease/keepalive`` and ``/v3/watch`` are streams: one JSON object per
  line, ``{"result": {...}}`` or ``{"error": {...}}``. A keepalive of a lease
  that is gone answers without ``TTL``. A watch first answers ``created``,
  then ``events`` (``type`` absent = PUT, ``"DELETE"``); ``canceled`` with
  ``compact_revision`` means the history it asked for was compacted; a reply
  with neither is a progress notification (all up to its revision was sent).
"""

from __future__ import annotations

import base64
from typing import Any

from ferry.core.cluster.store import Compare, Entry, Op, Put, Target
from ferry.errors import InvalidInputError

GRPC_NOT_FOUND = 5
GRPC_INVALID_ARGUMENT = 3


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key after every key that starts with ``prefix`` (etcd's ``range_end``)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"  # every key
    return stripped[:-1] + bytes([stripped[-1] + 1])


def key_range(key: str, prefix: bool) -> dict[str, str]:
    raw = key.encode()
    if not prefix:
        return {"key": b64(raw)}
    if not raw:
        return {"key": b64(b"\0"), "range_end": b64(b"\0")}
    return {"key": b64(raw), "range_end": b64(prefix_end(raw))}


def int_field(fields: dict[str, Any], name: str) -> int:
    return int(fields.get(name) or 0)


def entry(kv: dict[str, Any]) -> Entry:
    return Entry(
        key=unb64(kv["key"]).decode(),
        value=unb64(kv.get("value", "")),
        create_revision=int_field(kv, "create_revision"),
        mod_revision=int_field(kv, "mod_revision"),
        version=int_field(kv, "version"),
        lease=int_field(kv, "lease"),
    )


def compare(compare: Compare) -> dict[str, Any]:
    out: dict[str, Any] = {"key": b64(compare.key.encode()), "result": "EQUAL"}
    if compare.target is Target.VALUE:
        if not isinstance(compare.value, bytes):
            raise InvalidInputError(f"compare of {compare.key}'s value needs bytes")
        out.update(target="VALUE", value=b64(compare.value))
    else:
        if not isinstance(compare.value, int):
            raise InvalidInputError(f"compare of {compare.key}'s revision needs an int")
        field = "mod_revision" if compare.target is Target.MOD else "create_revision"
        out.update(target=compare.target.name, **{field: str(compare.value)})
    return out


def op(op: Op) -> dict[str, Any]:
    if isinstance(op, Put):
        put: dict[str, str] = {"key": b64(op.key.encode()), "value": b64(op.value)}
        if op.lease:
            put["lease"] = str(op.lease)
        return {"request_put": put}
    return {"request_delete_range": key_range(op.key, op.prefix)}


def refusal(payload: dict[str, Any]) -> tuple[int, str] | None:
    """``(grpc code, message)`` of an etcd error reply, unary or stream form."""
    error = payload.get("error")
    if error is None:
        return None
    if isinstance(error, dict):  # a stream's error object
        return int(error.get("grpc_code") or 0), str(error.get("message", error))
    return int(payload.get("code") or 0), str(payload.get("message") or error)
