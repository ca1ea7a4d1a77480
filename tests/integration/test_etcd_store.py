"""EtcdStore against a real etcd: the shared conformance suite, then what only a network has.

Unreachable endpoints, failing over, a client certificate of another CA, and
an etcd stopped and started again under an open store and watch. The etcd
member runs on loopback with mutual TLS (``etcd`` fixture).
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from ferry.adapters import pki
from ferry.adapters.etcd import EtcdStore, open_store
from ferry.core.cluster.store import EventKind
from ferry.errors import LeaseLostError, StoreUnavailableError
from ferry.testing.store_conformance import CHECKS, Check
from tests.integration.conftest import EtcdEnv
from tests.integration.tcp_proxy import TcpProxy, tcp_proxy

pytestmark = pytest.mark.integration


@dataclass
class EtcdHarness:
    store: EtcdStore
    prefix: str

    async def let_expire(self, lease: int) -> None:
        deadline = time.monotonic() + 20
        while await self.store.time_to_live(lease) != -1:
            assert time.monotonic() < deadline, f"etcd never expired lease {lease:x}"
            await asyncio.sleep(0.2)

    async def compact(self, revision: int) -> None:
        await self.store.compact(revision)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_etcd_store_conforms(etcd: EtcdEnv, check: Check) -> None:
    async def run() -> None:
        store = open_store([etcd.url], etcd.client_tls)
        try:
            await check(EtcdHarness(store, f"/conformance/{uuid.uuid4().hex[:8]}/"))
        finally:
            await store.close()

    asyncio.run(run())


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"https://127.0.0.1:{port}"  # nothing listens there once the socket closed


def test_unreachable_endpoints_are_store_unavailable_naming_each(etcd: EtcdEnv) -> None:
    dead1, dead2 = _dead_url(), _dead_url()

    async def run() -> None:
        store = open_store([dead1, dead2], etcd.client_tls)
        try:
            for call in (store.get("/x"), store.put("/x", b"1"), store.keepalive(5)):
                with pytest.raises(StoreUnavailableError) as caught:
                    await call
                assert dead1 in str(caught.value) and dead2 in str(caught.value)
            with pytest.raises(StoreUnavailableError, match=dead1):
                await anext(store.watch("/x/"))
        finally:
            await store.close()

    asyncio.run(run())


def test_calls_and_watches_fail_over_to_a_live_endpoint(etcd: EtcdEnv) -> None:
    dead = _dead_url()

    async def run() -> None:
        store = open_store([dead, etcd.url], etcd.client_tls)
        try:
            revision = await store.put("/failover/a", b"1")  # never reached: safe to move on
            entry = await store.get("/failover/a")
            assert entry is not None and entry.mod_revision == revision
            assert store.endpoints == (dead, etcd.url)
            events = store.watch("/failover/", start_revision=revision)
            try:
                event = await asyncio.wait_for(anext(events), 10)
            finally:
                await events.aclose()
            assert (event.kind, event.entry.value) == (EventKind.PUT, b"1")
        finally:
            await store.close()

    asyncio.run(run())


def test_a_watch_resumes_on_the_next_endpoint_losing_and_repeating_nothing(
    etcd: EtcdEnv,
) -> None:
    """The first endpoint is a proxy that is cut mid-watch: the watch goes on at the
    second from the revision after the last it gave, while writes go on meanwhile."""
    port = int(etcd.url.rsplit(":", 1)[1])

    async def run(proxy: TcpProxy) -> None:
        store = open_store([f"https://{proxy.url_host}", etcd.url], etcd.client_tls)
        writer = open_store([etcd.url], etcd.client_tls)
        try:
            start = await writer.put("/resume/k", b"1")
            events = store.watch("/resume/", start_revision=start)
            try:
                assert (await asyncio.wait_for(anext(events), 10)).entry.value == b"1"
                assert proxy.cut() >= 1, "the watch was not going through the proxy"
                for value in (b"2", b"3"):
                    await writer.put("/resume/k", value)
                later = [await asyncio.wait_for(anext(events), 10) for _ in range(2)]
                await writer.put("/resume/k", b"4")
                later.append(await asyncio.wait_for(anext(events), 10))
            finally:
                await events.aclose()
            assert [e.entry.value for e in later] == [b"2", b"3", b"4"]
            revisions = [e.entry.mod_revision for e in later]
            assert revisions == list(range(start + 1, start + 4)), "none lost, none twice"
        finally:
            await store.close()
            await writer.close()

    with tcp_proxy(("127.0.0.1", port)) as proxy:
        asyncio.run(run(proxy))


def test_a_silent_watch_reopens_and_misses_nothing(etcd: EtcdEnv) -> None:
    """A watch that hears nothing for watch_idle_s opens its stream again (this
    etcd sends progress notes every 5 s; the watch waits 1 s here)."""
    tls = pki.client_ssl_context(etcd.client_tls)

    async def run() -> None:
        store = EtcdStore([etcd.url], tls, watch_idle_s=1.0)
        try:
            start = await store.revision() + 1
            events = store.watch("/silent/", start_revision=start)
            try:
                await store.put("/silent/a", b"1")
                first = await asyncio.wait_for(anext(events), 10)
                await asyncio.sleep(2.5)  # at least two silent stretches
                await store.put("/silent/a", b"2")
                second = await asyncio.wait_for(anext(events), 10)
            finally:
                await events.aclose()
            assert (first.entry.value, second.entry.value) == (b"1", b"2")
            assert second.entry.mod_revision == first.entry.mod_revision + 1
        finally:
            await store.close()

    asyncio.run(run())


def test_a_certificate_of_another_ca_is_refused(etcd: EtcdEnv, tmp_path: Path) -> None:
    pki.create_ca(tmp_path / "other-ca", name="other-ca")
    pki.issue_host_cert(tmp_path / "other-ca", tmp_path / "other", "intruder")

    async def run() -> None:
        # Trusting the real CA but presenting a certificate of another one.
        (tmp_path / "other" / "ca-cert.pem").write_bytes(
            (etcd.client_tls / "ca-cert.pem").read_bytes()
        )
        store = open_store([etcd.url], tmp_path / "other")
        try:
            with pytest.raises(StoreUnavailableError, match=etcd.url):
                await store.get("/x")
        finally:
            await store.close()
        # Trusting only another CA: the server's certificate is not believed.
        (tmp_path / "other" / "ca-cert.pem").write_bytes(
            (tmp_path / "other-ca" / "ca-cert.pem").read_bytes()
        )
        store = open_store([etcd.url], tmp_path / "other")
        try:
            with pytest.raises(StoreUnavailableError, match="certificate"):
                await store.get("/x")
        finally:
            await store.close()

    asyncio.run(run())


def test_an_etcd_restart_under_an_open_store_and_watch(etcd: EtcdEnv) -> None:
    """While etcd is down every call and the watch say so naming its URL; after it is back
    the same store works, the URL is the same, and a lease granted before still renews."""

    async def run() -> None:
        store = open_store([etcd.url], etcd.client_tls)
        try:
            lease = await store.grant(30)
            start = await store.put("/restart/a", b"1", lease=lease)
            events = store.watch("/restart/", start_revision=start)
            first = await asyncio.wait_for(anext(events), 10)
            assert first.entry.value == b"1"
            url = etcd.server.url
            etcd.server.stop()
            assert etcd.server.pid() is None
            with pytest.raises(StoreUnavailableError, match=etcd.url):
                await asyncio.wait_for(anext(events), 10)
            with pytest.raises(StoreUnavailableError, match=etcd.url):
                await store.keepalive(lease)
            etcd.server.start()
            assert etcd.server.url == url
            assert await store.keepalive(lease) == 30
            entry = await store.get("/restart/a")
            assert entry is not None and entry.lease == lease
            await store.revoke(lease)
            with pytest.raises(LeaseLostError):
                await store.keepalive(lease)
        finally:
            await store.close()

    asyncio.run(run())
