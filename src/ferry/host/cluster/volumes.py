"""Cluster volumes: a directory every node sees at one path, proven by probe files.

``cluster volume add NAME PATH`` reaches one node, which proves the claim
through the agents before it records ``volumes/<NAME>``: every node writes
its own probe file into PATH (a random token per node), every node reads
every node's probe file, then each removes its own (the wire format is
:mod:`ferry.peer.cluster`). A node that is not up, cannot write there, or
misses another node's file refuses the volume with one line that names it;
nothing is recorded and the probe files are removed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from ferry.adapters.os_errors import os_errors
from ferry.adapters.pki import CertInfo, Role
from ferry.core.cluster.nodes import NodeState, NodeView
from ferry.core.cluster.records import EventKind, VolumeRecord
from ferry.core.cluster.store import Compare, Put
from ferry.core.spec import check_name
from ferry.errors import AuthError, ConflictError, FerryError, InvalidInputError, StorageError
from ferry.host.cluster.membership import ClusterContext, Membership
from ferry.peer import cluster as wire
from ferry.peer.client import Connector, Timeout
from ferry.peer.server import Call, PeerServer

log = logging.getLogger(__name__)


def probe_file(path: Path, volume: str, node: str) -> Path:
    return path / f".ferry-probe-{volume}-{node}"


def write_probe(path: Path, volume: str, node: str, token: str) -> None:
    if not path.is_dir():
        raise StorageError(f"{path} is not a directory on node {node}")
    target = probe_file(path, volume, node)
    with os_errors(f"node {node} cannot write its probe file into {path}"):
        target.write_text(token)


def missing_probes(path: Path, volume: str, tokens: dict[str, str]) -> list[str]:
    """The nodes whose probe file is absent here or holds another token."""
    missing = []
    for node, token in sorted(tokens.items()):
        try:
            found = probe_file(path, volume, node).read_text()
        except OSError:
            found = None
        if found != token:
            missing.append(node)
    return missing


def clean_probe(path: Path, volume: str, node: str) -> None:
    try:
        probe_file(path, volume, node).unlink(missing_ok=True)
    except OSError as exc:  # a leftover probe file harms nothing; say so and go on
        log.warning("cannot remove probe file in %s: %s", path, exc)


async def require_node(call: Call[Any], m: Membership) -> None:
    """The caller is an admin or a node of ``m``'s cluster; AuthError otherwise."""
    if call.caller.role is not Role.ADMIN:
        caller = call.require_host()
        if await m.store.get(m.keys.member(caller)) is None:
            raise AuthError(f"host {caller!r} is not a node of cluster {m.cluster}")


def odd_nodes(missing: dict[str, list[str]], *, prefer: str) -> list[str]:
    """The nodes whose view of the directory differs from the most common one.

    ``missing`` is, per reading node, the nodes whose probe it did not find.
    The view most nodes share is the directory; on a tie, ``prefer``'s (the
    node that runs the check). Empty when every node saw every probe.
    """
    if not any(missing.values()):
        return []
    views = {node: frozenset(gone) for node, gone in missing.items()}
    counts: dict[frozenset[str], int] = {}
    for view in views.values():
        counts[view] = counts.get(view, 0) + 1
    best = max(counts.values())
    common = views[prefer] if counts.get(views.get(prefer, frozenset())) == best else next(
        view for view, count in counts.items() if count == best)  # fmt: skip
    return sorted(node for node, view in views.items() if view != common) or sorted(common)


def _nodes(names: list[str]) -> str:
    return ("node " if len(names) == 1 else "nodes ") + ", ".join(names)


class VolumeService:
    """Adds and lists a cluster's volumes, and answers other nodes' probes."""

    def __init__(self, context: ClusterContext, connector: Connector, *, node: str) -> None:
        self.context = context
        self.connector = connector
        self.node = node
        # Tests swap this to make one node "see" another directory.
        self.resolve: Callable[[str], Path] = Path

    def register(self, server: PeerServer) -> None:
        server.handle(wire.PROBE, self.answer_probe, guard=self._guard)

    def _guard(self, caller: CertInfo, params: dict[str, str]) -> None:
        m = self.context.membership
        if m is None or params.get("cluster") != m.cluster:
            raise AuthError(f"{caller.common_name!r} asked node {self.node} about cluster "
                            f"{params.get('cluster')!r}, which this host is not in")  # fmt: skip

    async def answer_probe(self, call: Call[wire.ProbeRequest]) -> wire.ProbeReply:
        m = self.context.membership
        assert m is not None  # the guard saw one
        await require_node(call, m)
        return await asyncio.to_thread(self._probe_here, call.body)

    def _probe_here(self, body: wire.ProbeRequest) -> wire.ProbeReply:
        path = self.resolve(body.path)
        if body.action == "write":
            write_probe(path, body.volume, self.node, body.tokens[self.node])
            return wire.ProbeReply(node=self.node)
        if body.action == "read":
            missing = missing_probes(path, body.volume, body.tokens)
            return wire.ProbeReply(node=self.node, missing=missing)
        clean_probe(path, body.volume, self.node)
        return wire.ProbeReply(node=self.node)

    async def records(self, m: Membership) -> list[VolumeRecord]:
        return [VolumeRecord.from_json(e.value) for e in await m.store.range(m.keys.volumes)]

    async def add(self, m: Membership, name: str, path: str) -> VolumeRecord:
        check_name(name, what="volume name")
        if not path.startswith("/"):
            raise InvalidInputError(f"volume path must be absolute, not {path!r}")
        record = VolumeRecord(name, path)
        if await m.store.get(m.keys.volume(name)) is not None:
            raise ConflictError(f"cluster {m.cluster} already has a volume named {name!r}")
        nodes = await m.nodes()
        away = [n for n in nodes if n.state not in (NodeState.UP, NodeState.DRAINING)]
        if away:
            raise ConflictError(
                f"cannot add volume {name!r}: node {away[0].name} is {away[0].state}, so it "
                f"cannot show that it sees {path}")  # fmt: skip
        tokens = {n.name: secrets.token_hex(8) for n in nodes}
        try:
            await self._each(m, nodes, name, path, "write", tokens)
            replies = await self._each(m, nodes, name, path, "read", tokens)
        finally:
            await self._each(m, nodes, name, path, "clean", tokens, quiet=True)
        odd = odd_nodes({reply.node: reply.missing for reply in replies}, prefer=self.node)
        if odd:
            others = sorted({n.name for n in nodes} - set(odd))
            raise ConflictError(
                f"volume {name!r} refused: node {odd[0]} does not see the directory at {path} "
                f"that {_nodes(others)} see{'s' if len(others) == 1 else ''} (probe files "
                "missing); every node must see the same directory")  # fmt: skip
        done = await m.store.txn([Compare.absent(m.keys.volume(name))],
                                 [Put(m.keys.volume(name), record.to_json())])  # fmt: skip
        if not done.succeeded:
            raise ConflictError(f"cluster {m.cluster} already has a volume named {name!r}")
        seen = f"volume {name} at {path}, seen by {len(nodes)} nodes"
        await m.record_event(EventKind.VOLUME_ADDED, node=self.node, reason=seen)
        return record

    async def _each(
        self,
        m: Membership,
        nodes: list[NodeView],
        volume: str,
        path: str,
        action: Literal["write", "read", "clean"],
        tokens: dict[str, str],
        *,
        quiet: bool = False,
    ) -> list[wire.ProbeReply]:
        body = wire.ProbeRequest(volume=volume, path=path, action=action, tokens=tokens)
        replies = []
        for node in nodes:
            try:
                if node.name == self.node:
                    replies.append(await asyncio.to_thread(self._probe_here, body))
                    continue
                async with self.connector.connect(node.name, node.url,
                                                  timeout=Timeout.PROBE) as peer:  # fmt: skip
                    replies.append(await peer.call(wire.PROBE, body, cluster=m.cluster))
            except FerryError as exc:
                if quiet:
                    log.warning("probe %s on node %s: %s", action, node.name, exc)
                    continue
                raise ConflictError(f"volume {volume!r} refused: node {node.name} could not "
                                    f"{action} its probe in {path}: {exc}") from exc  # fmt: skip
        return replies
