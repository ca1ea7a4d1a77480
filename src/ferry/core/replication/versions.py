"""The functional-level rule between a primary and its replica, and when replication reverses."""

from __future__ import annotations

from ferry.errors import VersionError


def check_replica_accepts(
    primary_level: int, replica_level: int, *, primary: str, replica: str, vm: str
) -> None:
    """A replica runs the same or a newer functional level than its primary."""
    if replica_level < primary_level:
        raise VersionError(
            f"replica host {replica!r} runs functional level {replica_level}, older than "
            f"primary host {primary!r} at level {primary_level}: it cannot receive "
            f"replication of VM {vm!r}; upgrade {replica!r} first (replica side before primary)"
        )


def check_reverse_allowed(
    running_level: int, old_primary_level: int, *, running_host: str, old_primary: str, vm: str
) -> None:
    """After failover the old primary becomes the replica: the same rule, reversed.

    ``running_host`` is the old replica where the VM now runs (the new
    primary); ``old_primary`` must run the same or a newer level.
    """
    if old_primary_level < running_level:
        raise VersionError(
            f"cannot reverse replication of VM {vm!r}: old primary host {old_primary!r} "
            f"runs functional level {old_primary_level}, older than host {running_host!r} "
            f"at level {running_level} where the VM now runs; upgrade {old_primary!r} first"
        )
