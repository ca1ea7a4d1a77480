"""Cluster membership over the in-memory store: create, join, leave, reconnect, election.

Every refusal is one line and leaves the store and ``cluster.json`` as they were.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from ferry.core.cluster.keys import ClusterKeys
from ferry.core.cluster.nodes import NodeState
from ferry.core.cluster.roles import Owner
from ferry.errors import (
    ConflictError,
    NotFoundError,
    StoreUnavailableError,
    VersionError,
)
from ferry.host.cluster import persisted
from ferry.testing.cluster import MemoryCluster

KEYS = ClusterKeys("c1")


def run(body: Callable[[MemoryCluster], Awaitable[None]], tmp_path: Path) -> None:
    async def main() -> None:
        lab = MemoryCluster(tmp_path)
        try:
            await body(lab)
        finally:
            for service in lab.services.values():
                await service.shutdown()

    asyncio.run(main())


async def three(lab: MemoryCluster) -> None:
    await lab.node("host-1").create("c1", [lab.url], None)
    await lab.node("host-2").join("c1", [lab.url], None)
    await lab.node("host-3").join("c1", [lab.url], None)


async def snapshot(lab: MemoryCluster) -> dict[str, Any]:
    entries = await lab.store.range("/")
    paths = {name: s.me.data_dir / persisted.FILE for name, s in lab.services.items()}
    files = {name: path.read_text() for name, path in paths.items() if path.exists()}
    return {"store": [(e.key, e.value, e.mod_revision) for e in entries], "files": files}


def test_create_and_join_make_members_that_are_up_with_one_leader(tmp_path: Path) -> None:
    async def body(lab: MemoryCluster) -> None:
        await three(lab)
        m1 = lab.membership("host-1")
        views = await m1.nodes()
        assert [(v.name, v.state) for v in views] == [
            ("host-1", NodeState.UP),
            ("host-2", NodeState.UP),
            ("host-3", NodeState.UP),
        ]
        assert views[0].memory_free == 4 * 1024**3 and views[0].url == "https://host-1.test:8443"
        assert m1.functional_level == 3
        # Every alive record is held by its node's lease.
        for name in ("host-1", "host-2", "host-3"):
            alive = await lab.store.get(KEYS.alive(name))
            assert alive is not None and alive.lease == lab.membership(name).lease
        assert [await lab.lead(n) for n in ("host-2", "host-1", "host-3")] == [True, False, False]
        assert lab.membership("host-2").is_leader()
        assert not m1.is_leader()
        saved = json.loads((tmp_path / "host-2" / persisted.FILE).read_text())
        assert saved == {"name": "c1", "etcd": [lab.url], "etcd_tls": None,
                         "lease": lab.membership("host-2").lease}  # fmt: skip
        kinds = [(e.kind, e.node) for e in await m1.events()]
        assert kinds == [("cluster-created", "host-1"), ("node-joined", "host-1"),
                         ("node-joined", "host-2"), ("node-joined", "host-3"),
                         ("leader-elected", "host-2")]  # fmt: skip

    run(body, tmp_path)


def test_the_leader_key_goes_with_its_lease_and_another_node_takes_it(tmp_path: Path) -> None:
    async def body(lab: MemoryCluster) -> None:
        await three(lab)
        assert await lab.lead("host-1")
        assert not await lab.lead("host-2")
        assert not await lab.lead("host-3")
        await lab.expire("host-1")
        assert await lab.store.get(KEYS.leader) is None
        assert await lab.lead("host-3")
        assert not await lab.lead("host-2")
        assert lab.membership("host-3").is_leader()
        # host-1 learns it no longer leads at its next round.
        assert not await lab.lead("host-1")
        assert not lab.membership("host-1").is_leader()
        events = [e for e in await lab.membership("host-2").events() if e.kind == "leader-elected"]
        assert [e.node for e in events] == ["host-1", "host-3"]
        assert "host-1 led before" in events[1].reason

    run(body, tmp_path)


def test_a_lost_lease_is_regranted_and_the_file_follows(tmp_path: Path) -> None:
    async def body(lab: MemoryCluster) -> None:
        await three(lab)
        m = lab.membership("host-2")
        old = m.lease
        await lab.expire("host-2")
        assert (await m.nodes())[1].state is NodeState.DOWN
        await m.on_lease_lost()
        assert m.lease != old
        alive = await lab.store.get(KEYS.alive("host-2"))
        assert alive is not None and alive.lease == m.lease
        saved = json.loads((tmp_path / "host-2" / persisted.FILE).read_text())
        assert saved["lease"] == m.lease

    run(body, tmp_path)


def test_an_agent_restart_keeps_a_living_lease_and_regrants_an_expired_one(tmp_path: Path) -> None:
    async def body(lab: MemoryCluster) -> None:
        await three(lab)
        lease = lab.membership("host-2").lease
        await lab.store.put(KEYS.fenced("host-2"), b'{"at": 1, "reason": "test"}')
        await lab.services["host-2"].shutdown()
        lab.clock.advance(3)  # the restart took 3 s of the 4 s TTL
        again = lab.restart("host-2")
        await again.start()
        assert lab.membership("host-2").lease == lease
        assert await lab.store.time_to_live(lease) == 4  # renewed at once
        assert await lab.store.get(KEYS.fenced("host-2")) is None
        assert again.info() == {"name": "c1", "node": "host-2", "etcd": [lab.url],
                                "etcd_tls": None, "connected": True, "leader": False}  # fmt: skip
        await again.shutdown()
        lab.store.expire(lease)
        third = lab.restart("host-2")
        await third.start()
        assert lab.membership("host-2").lease != lease
        views = await lab.membership("host-1").nodes()
        assert [v.state for v in views] == [NodeState.UP] * 3
        reasons = [e.reason for e in await lab.membership("host-1").events()
                   if e.kind == "node-reconnected"]  # fmt: skip
        assert reasons[0].endswith(f"lease {lease:x} kept") and "new lease" in reasons[1]

    run(body, tmp_path)


def test_reconnect_retries_in_the_background_while_etcd_is_away(tmp_path: Path) -> None:
    async def body(lab: MemoryCluster) -> None:
        await three(lab)
        await lab.services["host-3"].shutdown()
        lab.store.set_available(False)
        again = lab.restart("host-3")
        again_retry = 0.01
        import ferry.host.cluster.service as service_module

        service_module.RECONNECT_RETRY_S = again_retry
        await again.start()
        assert again.membership is None
        assert again.info() is not None and again.info()["connected"] is False  # type: ignore[index]
        with pytest.raises(StoreUnavailableError, match="cannot reach its etcd"):
            again.member_of("c1")
        lab.store.set_available(True)
        for _ in range(100):
            if again.membership is not None:
                break
            await asyncio.sleep(again_retry)
        assert again.membership is not None and again.membership.node == "host-3"
        service_module.RECONNECT_RETRY_S = 2.0

    run(body, tmp_path)


def test_bad_membership_input_is_refused_in_one_line_and_changes_nothing(tmp_path: Path) -> None:
    async def body(lab: MemoryCluster) -> None:
        await lab.node("host-1").create("c1", [lab.url], None)
        await lab.node("host-2").join("c1", [lab.url], None)
        await lab.node("host-9").create("c9", [lab.url], None)
        lab.node("host-3")
        lab.node("old", functional_level=2)
        before = await snapshot(lab)
        refusals: list[tuple[Awaitable[Any], type[Exception], str]] = [
            (lab.node("host-3").join("nope", [lab.url], None), NotFoundError,
             f"no cluster named 'nope' in etcd at {lab.url}"),
            (lab.node("host-2").join("c9", [lab.url], None), ConflictError,
             "host host-2 is already a node of cluster c1; a host is in one cluster at a time"),
            (lab.node("host-2").join("c1", [lab.url], None), ConflictError,
             "host host-2 is already a node of cluster c1"),
            (lab.node("host-3").create("c1", [lab.url], None), ConflictError,
             "cluster c1 already exists in etcd at"),
            (lab.node("host-3").create("c2", ["https://127.0.0.1:1"], None),
             StoreUnavailableError, "https://127.0.0.1:1"),
            (lab.node("host-3").join("c1", ["https://127.0.0.1:1", "https://127.0.0.1:2"], None),
             StoreUnavailableError, "https://127.0.0.1:1, https://127.0.0.1:2"),
            (lab.node("host-3").join("c1", ["ftp://x"], None), Exception, "must look like"),
            (lab.node("host-3").join("c1", [], None), Exception, "at least one etcd URL"),
            (lab.node("old").join("c1", [lab.url], None), VersionError,
             "host old runs functional level 2, below cluster c1's level 3"),
            (lab.node("host-3").leave("c1"), NotFoundError,
             "host host-3 is not a node of cluster 'c1' (it is in no cluster)"),
            (lab.node("host-9").leave("c9"), ConflictError,
             "node host-9 is the last node of cluster c9; a cluster keeps at least one node"),
        ]  # fmt: skip
        for call, kind, text in refusals:
            with pytest.raises(kind) as caught:
                await call
            assert text in str(caught.value) and "\n" not in str(caught.value)
        assert await snapshot(lab) == before

    run(body, tmp_path)


def test_a_node_that_owns_vms_cannot_leave_until_they_are_gone(tmp_path: Path) -> None:
    async def body(lab: MemoryCluster) -> None:
        await three(lab)
        await lab.store.put(KEYS.name("web"), b"u-1")
        await lab.store.put(KEYS.vm_owner("u-1"), Owner.settled("host-2").encode())
        before = await snapshot(lab)
        with pytest.raises(ConflictError, match=r"node host-2 still owns 1 VM\(s\) of cluster "
                           r"c1 \(web\); drain it first"):  # fmt: skip
            await lab.services["host-2"].leave("c1")
        assert await snapshot(lab) == before
        await lab.store.put(KEYS.vm_owner("u-1"), Owner.settled("host-3").encode())
        assert await lab.lead("host-2")
        lease = lab.membership("host-2").lease
        assert await lab.services["host-2"].leave("c1") == {"name": "c1", "node": "host-2",
                                                             "left": True}  # fmt: skip
        assert lab.services["host-2"].membership is None
        assert lab.services["host-2"].info() is None
        assert not (tmp_path / "host-2" / persisted.FILE).exists()
        for key in (KEYS.member("host-2"), KEYS.alive("host-2"), KEYS.leader):
            assert await lab.store.get(key) is None, key
        assert await lab.store.time_to_live(lease) == -1
        assert [v.name for v in await lab.membership("host-1").nodes()] == ["host-1", "host-3"]
        # It may join again (or another cluster).
        await lab.services["host-2"].join("c1", [lab.url], None)
        assert len(await lab.membership("host-1").nodes()) == 3

    run(body, tmp_path)


def test_https_endpoints_use_the_hosts_tls_dir_unless_told(tmp_path: Path) -> None:
    async def body(lab: MemoryCluster) -> None:
        one = lab.node("host-1")
        with pytest.raises(StoreUnavailableError):
            await one.create("c1", ["https://127.0.0.1:1"], None)
        with pytest.raises(StoreUnavailableError):
            await one.create("c1", ["https://127.0.0.1:1"], "/etc/etcd-client")
        with pytest.raises(StoreUnavailableError):
            await one.create("c1", ["http://127.0.0.1:1"], None)
        assert [tls for _, tls in lab.opened] == [tmp_path / "host-1" / "tls",
                                                   Path("/etc/etcd-client"), None]  # fmt: skip

    run(body, tmp_path)


def test_the_events_log_keeps_the_newest(tmp_path: Path) -> None:
    async def body(lab: MemoryCluster) -> None:
        await three(lab)
        m = lab.membership("host-1")
        for i in range(250):
            await m.record_event("test", reason=str(i))
        assert await m.prune_events(keep=100) == 254 - 100
        kept = await m.events()
        assert len(kept) == 100 and kept[-1].reason == "249" and kept[0].reason == "150"

    run(body, tmp_path)
