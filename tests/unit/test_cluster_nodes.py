"""Node states from their records (pure) and the volume probe between nodes in memory."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ferry.core.cluster.keys import ClusterKeys
from ferry.core.cluster.nodes import MemberRecord, NodeState, node_state, still_fenced
from ferry.core.cluster.store import Entry
from ferry.errors import ConflictError, FerryError
from ferry.host.cluster.volumes import odd_nodes
from ferry.testing.cluster import MemoryCluster

KEYS = ClusterKeys("c1")


@pytest.mark.parametrize(
    ("alive", "fenced", "draining", "state"),
    [
        (True, False, False, NodeState.UP),
        (False, False, False, NodeState.DOWN),
        (True, False, True, NodeState.DRAINING),
        (False, False, True, NodeState.DOWN),
        (True, True, False, NodeState.FENCED),
        (False, True, True, NodeState.FENCED),
    ],
)
def test_node_state_table(alive: bool, fenced: bool, draining: bool, state: NodeState) -> None:
    member = MemberRecord("n", "https://n:1", "0.1.0", 3, 0.0, draining=draining)
    assert node_state(member, alive=alive, fenced=fenced) is state


def test_states_from_the_store(tmp_path: Path) -> None:
    async def main() -> None:
        lab = MemoryCluster(tmp_path)
        await lab.node("a").create("c1", [lab.url], None)
        for name in ("b", "c", "d"):
            await lab.node(name).join("c1", [lab.url], None)
        await lab.expire("b")
        await lab.store.put(KEYS.fenced("c"), b'{"at": 1, "reason": "lease not renewed"}')
        m = lab.membership("d")
        await m.put_member(MemberRecord(**{**m.member.__dict__, "draining": True}))
        views = await lab.membership("a").nodes()
        assert [(v.name, v.state.value, v.memory_free > 0) for v in views] == [
            ("a", "up", True), ("b", "down", False), ("c", "fenced", True),
            ("d", "draining", True)]  # fmt: skip

    asyncio.run(main())


def test_a_fenced_node_is_up_again_once_it_rejoined_with_a_new_lease(tmp_path: Path) -> None:
    async def main() -> None:
        lab = MemoryCluster(tmp_path)
        await lab.node("a").create("c1", [lab.url], None)
        await lab.node("c").join("c1", [lab.url], None)
        # c fenced itself: its mark is written, then its old lease goes.
        await lab.store.put(KEYS.fenced("c"), b'{"at": 1, "reason": "lease not renewed"}')
        await lab.expire("c")
        states = {v.name: v.state.value for v in await lab.membership("a").nodes()}
        assert states["c"] == "fenced"
        # It takes a new lease (a new alive record after the mark): up again,
        # the mark kept as the record of the fence.
        await lab.membership("c").regrant()
        states = {v.name: v.state.value for v in await lab.membership("a").nodes()}
        assert states["c"] == "up"
        assert await lab.store.get(KEYS.fenced("c")) is not None
        # A later fence (a newer mark) makes it fenced again.
        await lab.store.put(KEYS.fenced("c"), b'{"at": 2, "reason": "lease not renewed"}')
        states = {v.name: v.state.value for v in await lab.membership("a").nodes()}
        assert states["c"] == "fenced"

    asyncio.run(main())


def _three(tmp_path: Path, body: object) -> None:
    async def main() -> None:
        lab = MemoryCluster(tmp_path)
        await lab.node("host-1").create("c1", [lab.url], None)
        await lab.node("host-2").join("c1", [lab.url], None)
        await lab.node("host-3").join("c1", [lab.url], None)
        await body(lab)  # type: ignore[operator]

    asyncio.run(main())


def test_a_volume_every_node_sees_is_added_and_its_probes_are_gone(tmp_path: Path) -> None:
    shared = tmp_path / "csv1"
    shared.mkdir()

    async def body(lab: MemoryCluster) -> None:
        m = lab.membership("host-2")
        record = await lab.volumes["host-2"].add(m, "csv1", str(shared))
        assert (record.name, record.path) == ("csv1", str(shared))
        assert [(v.name, v.path) for v in await lab.volumes["host-1"].records(
            lab.membership("host-1"))] == [("csv1", str(shared))]  # fmt: skip
        assert list(shared.iterdir()) == []
        probes = {(src, dst) for src, dst, _, path in lab.network.calls if "probe" in path}
        assert probes == {("host-2", "host-1"), ("host-2", "host-3")}
        events = [e for e in await m.events() if e.kind == "volume-added"]
        assert events[0].reason == f"volume csv1 at {shared}, seen by 3 nodes"
        with pytest.raises(ConflictError, match="already has a volume named 'csv1'"):
            await lab.volumes["host-1"].add(lab.membership("host-1"), "csv1", str(shared))

    _three(tmp_path, body)


def test_a_volume_one_node_does_not_see_is_refused_naming_it(tmp_path: Path) -> None:
    shared = tmp_path / "csv1"
    shared.mkdir()
    elsewhere = tmp_path / "host-3-local"
    elsewhere.mkdir()

    async def body(lab: MemoryCluster) -> None:
        # host-3 has its own directory at that path (an NFS mount that is missing).
        lab.volumes["host-3"].resolve = lambda path: elsewhere
        before = await lab.store.range("/")
        with pytest.raises(ConflictError) as caught:
            await lab.volumes["host-1"].add(lab.membership("host-1"), "csv1", str(shared))
        assert str(caught.value) == (
            f"volume 'csv1' refused: node host-3 does not see the directory at {shared} that "
            "nodes host-1, host-2 see (probe files missing); every node must see the same "
            "directory"
        )
        assert await lab.store.range("/") == before
        assert list(shared.iterdir()) == [] and list(elsewhere.iterdir()) == []
        # A directory that is not there at all, and a node that is down.
        with pytest.raises(ConflictError, match="node host-1 could not write its probe in"):
            await lab.volumes["host-1"].add(lab.membership("host-1"), "v2", str(tmp_path / "no"))
        await lab.expire("host-2")
        with pytest.raises(ConflictError, match="node host-2 is down, so it cannot show"):
            await lab.volumes["host-1"].add(lab.membership("host-1"), "v3", str(shared))
        with pytest.raises(FerryError, match="must be absolute"):
            await lab.volumes["host-1"].add(lab.membership("host-1"), "v4", "relative")

    _three(tmp_path, body)


def test_the_odd_node_is_the_one_whose_view_differs() -> None:
    assert odd_nodes({"a": [], "b": [], "c": []}, prefer="a") == []
    assert odd_nodes({"a": ["c"], "b": ["c"], "c": ["a", "b"]}, prefer="a") == ["c"]
    assert odd_nodes({"a": ["c"], "b": ["c"], "c": ["a", "b"]}, prefer="c") == ["c"]
    assert odd_nodes({"a": ["b"], "b": ["a"]}, prefer="a") == ["b"]
    assert odd_nodes({"a": ["b"], "b": ["b"]}, prefer="a") == ["b"]


def test_a_probe_from_a_host_outside_the_cluster_is_refused(tmp_path: Path) -> None:
    async def body(lab: MemoryCluster) -> None:
        from ferry.peer import cluster as wire
        from ferry.peer.server import PeerServer
        from ferry.testing.peers import host_cert

        lab.network.join("stranger", PeerServer(), host_cert("stranger"))
        request = wire.ProbeRequest(volume="v", path=str(tmp_path), action="write",
                                    tokens={"host-1": "x"})  # fmt: skip
        async with lab.network.connector("stranger").connect("host-1", "https://x") as peer:
            with pytest.raises(FerryError, match="host 'stranger' is not a node of cluster c1"):
                await peer.call(wire.PROBE, request, cluster="c1")
            with pytest.raises(FerryError, match="'stranger' asked node host-1 about cluster 'c2'"):
                await peer.call(wire.PROBE, request, cluster="c2")
        assert list(tmp_path.glob(".ferry-probe-*")) == []

    _three(tmp_path, body)


def test_still_fenced_until_a_newer_alive_record() -> None:
    def entry(create: int, mod: int) -> Entry:
        return Entry("k", b"{}", create_revision=create, mod_revision=mod, version=1)

    assert not still_fenced(None, entry(5, 9))
    assert still_fenced(entry(7, 7), None)  # fenced, not back
    assert still_fenced(entry(7, 7), entry(5, 9))  # alive from before the mark
    assert not still_fenced(entry(7, 7), entry(8, 12))  # rejoined after the mark
    assert still_fenced(entry(7, 13), entry(8, 12))  # fenced again since
