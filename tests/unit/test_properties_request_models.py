"""Property tests of every API and peer request model: hostile JSON is a 400, never a 500.

The models are found, not listed: every model an admin route reads through
``read_body`` (its name taken from the route modules' source) and every
peer route's request model (every ``Route`` in every ferry module). Each one
gets random bytes, random JSON, and objects made of its own field names
with plausible and hostile values. It goes through the real edge (``read_body``
for the admin API, ``PeerServer.dispatch`` for peers): the answer is the
model, or a FerryError with a 4xx status; anything else would be a 500.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

import ferry
from ferry.adapters.pki import CertInfo, Role
from ferry.api.edge import read_body
from ferry.errors import FerryError
from ferry.peer.routes import NoBody, Route, Upload
from ferry.peer.server import PeerServer
from tests.unit.strategies import fast, json_values

FAST = fast(25)
_READ = re.compile(r"(?:read_body|_body)\(\s*request,\s*([A-Z]\w+)\s*\)")


def _modules() -> list[Any]:
    """Every module of ferry (by file: some packages, like ferry.peer, have no __init__)."""
    root = Path(ferry.__file__).parent
    names = sorted(".".join(("ferry", *p.relative_to(root).with_suffix("").parts))
                   for p in root.rglob("*.py") if p.name != "__main__.py")  # fmt: skip
    return [importlib.import_module(name.removesuffix(".__init__")) for name in names]


MODULES = _modules()


def _admin_models() -> dict[str, type[BaseModel]]:
    models: dict[str, type[BaseModel]] = {}
    for module in MODULES:
        if not module.__name__.startswith(("ferry.api.", "ferry.web.")):
            continue
        for name in _READ.findall(Path(module.__file__).read_text()):
            model = getattr(module, name)
            assert issubclass(model, BaseModel), f"{module.__name__}.{name}"
            models[f"{model.__module__}.{name}"] = model
    return models


def _peer_routes() -> dict[str, Route[Any, Any]]:
    routes: dict[str, Route[Any, Any]] = {}
    for module in MODULES:
        for value in vars(module).values():
            if isinstance(value, Route) and value.request not in (NoBody, Upload):
                routes[f"{value.method} {value.path}"] = value
    return routes


ADMIN = _admin_models()
PEER = _peer_routes()


def test_the_models_are_found() -> None:
    # So that a change in how routes read bodies cannot leave this test checking nothing.
    assert len(ADMIN) >= 20, sorted(ADMIN)
    assert len(PEER) >= 8, sorted(PEER)  # the other peer routes take no body or raw bytes
    assert "ferry.api.models.CreateVmRequest" in ADMIN
    assert "POST /v1/peer/migrations" in PEER


plausible = st.sampled_from([
    "vm1", "host-1", "lab", "1G", "256M", "30s", "5m", "-1", "0", "../etc/passwd", "/tmp/x",
    "a" * 300, "vm1\n", "", "02:00:00:00:00:01", "lab=prod", "=", "https://127.0.0.1:1",
    "6b3b3f0e-2d39-4a2b-9a53-0d5a8f1c2e11", "qcow2", "copy", "shared", "auto", "uefi", "\x00",
    0, -1, 1, 2**31, 2**63, -(2**63), 1e308, True, [], {}, None, ["vm1"], {"lab": "prod"},
])  # fmt: skip


def _shaped(model: type[BaseModel]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with (mostly) the model's own keys, so its validators are reached."""
    keys = [f.alias or name for name, f in model.model_fields.items()]
    key = st.sampled_from(keys) if keys else st.text(max_size=8)
    return st.dictionaries(key | st.text(max_size=6), plausible | json_values, max_size=8)


def _bodies(model: type[BaseModel]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=64),
        json_values.map(lambda v: json.dumps(v).encode()),
        _shaped(model).map(lambda v: json.dumps(v).encode()),
    )


class _Request:
    """What ``read_body`` uses of an aiohttp request."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def read(self) -> bytes:
        return self.body


def _client_error(exc: FerryError) -> None:
    assert 400 <= exc.http_status < 500, f"{type(exc).__name__} ({exc.http_status}): {exc}"
    assert "\n" not in str(exc).strip()


@pytest.mark.parametrize("name", sorted(ADMIN))
def test_admin_request_models(name: str) -> None:
    model = ADMIN[name]

    @FAST
    @given(_bodies(model))
    def check(body: bytes) -> None:
        try:
            parsed = runner.run(read_body(_Request(body), model))  # type: ignore[arg-type]
        except FerryError as exc:
            _client_error(exc)
        else:
            assert isinstance(parsed, model)

    with asyncio.Runner() as runner:  # one loop for all examples: each new one costs
        check()


CALLER = CertInfo(subject="CN=host-2,OU=hosts,O=ferry", common_name="host-2", role=Role.HOST,
                  thumbprint="0" * 64, not_after=dt.datetime(2099, 1, 1, tzinfo=dt.UTC),
                  dns_names=("host-2",), ips=())  # fmt: skip


@pytest.mark.parametrize("name", sorted(PEER))
def test_peer_request_models(name: str) -> None:
    route = PEER[name]
    server = PeerServer()
    seen: list[BaseModel] = []

    async def handler(call: Any) -> BaseModel:
        seen.append(call.body)
        return NoBody()

    server.handle(route, handler)
    path = route.url(**{p: "x1" for p in route.params})

    @FAST
    @given(_bodies(route.request))
    def check(body: bytes) -> None:
        seen.clear()
        status, payload = runner.run(server.dispatch(CALLER, route.method, path, body=body))
        if status == route.status:
            assert len(seen) == 1 and isinstance(seen[0], route.request)
        else:
            assert 400 <= status < 500 and not seen, (status, payload)
            message = payload["error"]["message"]
            assert message and "\n" not in message.strip()

    with asyncio.Runner() as runner:
        check()


def test_a_hostile_key_stays_on_one_line() -> None:
    """Found by the properties above: a key with a newline split the error in two lines."""
    from ferry.core.replica_server import ReplicaServerSettings

    with pytest.raises(FerryError) as caught:
        asyncio.run(read_body(_Request(b'{"\\n": ""}'), ReplicaServerSettings))  # type: ignore[arg-type]
    assert str(caught.value) == "invalid request: '\\n': Extra inputs are not permitted"
