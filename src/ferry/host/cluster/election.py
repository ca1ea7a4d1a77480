"""Leader election through the store: one transaction, "leader absent -> leader = me".

The leader key is put with the winner's lease, so it disappears when the
leader stops renewing (etcd expires it by its own clock) or leaves. Every
node campaigns each ``leader_poll_s``: while the key exists the transaction
fails and the node reads who leads; once it is gone the first transaction to
arrive wins. A node leads only while the key holds its name *and* its current
lease (after a regrant the old key is gone with the old lease).
"""

from __future__ import annotations

from ferry.core.cluster.records import EventKind
from ferry.core.cluster.store import Compare, Put
from ferry.host.cluster.membership import Membership


class LeaderElection:
    """Campaigns for one membership and keeps its ``is_leader()`` true to the store."""

    def __init__(self, membership: Membership) -> None:
        self.membership = membership
        self.leader: str | None = None  # who leads, as last read

    async def campaign(self) -> bool:
        """One round: take the key if it is free; True if this node leads now."""
        m = self.membership
        key = m.keys.leader
        result = await m.store.txn(
            [Compare.absent(key)], [Put(key, m.node.encode(), lease=m.lease)]
        )
        was = m.is_leader()
        if result.succeeded:
            leading, previous = True, self.leader
            self.leader = m.node
        else:
            entry = await m.store.get(key)
            previous = self.leader
            self.leader = entry.value.decode() if entry is not None else None
            leading = entry is not None and self.leader == m.node and entry.lease == m.lease
        m.set_leader(leading)
        if leading and not was:
            before = f"; {previous} led before" if previous and previous != m.node else ""
            await m.record_event(EventKind.LEADER, node=m.node,
                                 reason=f"won the leader election{before}")  # fmt: skip
        return leading
