"""QEMU's side of a live migration: the QMP sequences, with QEMU's words typed.

- :mod:`.channel`: the QMP interface these sequences need, :class:`MigrationStatus`
  and the typed ``query-migrate`` / ``query-block-jobs`` replies.
- :mod:`.outgoing`: the source's memory stream, disk mirrors, switch-over, undo.
- :mod:`.incoming`: the destination's waiting QEMU, its settling and resume.

The host's move job (:mod:`ferry.host.migration`) decides when each runs.
"""

from ferry.adapters.migration.channel import (
    BlockJob,
    Channel,
    Events,
    MigrationInfo,
    MigrationStatus,
)
from ferry.adapters.migration.incoming import IncomingEndpoints
from ferry.adapters.migration.outgoing import MirrorProgress, OutgoingMigration

__all__ = [
    "BlockJob",
    "Channel",
    "Events",
    "IncomingEndpoints",
    "MigrationInfo",
    "MigrationStatus",
    "MirrorProgress",
    "OutgoingMigration",
]
