"""The catalog's SQLite schema, as the forward migrations that build it.

Append only: version N's statements bring a catalog at N-1 to N, and
:class:`ferry.adapters.catalog.Catalog` applies the missing ones in one
transaction when it opens a catalog.
"""

from __future__ import annotations

from ferry.core.versions import DATA_SCHEMA_VERSION

# schema version -> statements that bring the previous version to it.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE vms (
            uuid TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            spec TEXT NOT NULL,
            state TEXT NOT NULL,
            created REAL NOT NULL,
            updated REAL NOT NULL
        )""",
    ),
    2: (
        # Jobs: long operations (moves, incoming moves), written before they act.
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            vm_uuid TEXT NOT NULL,
            vm_name TEXT NOT NULL,
            state TEXT NOT NULL,
            detail TEXT NOT NULL,
            created REAL NOT NULL,
            updated REAL NOT NULL
        )""",
        # Shared volumes: a dir this host sees that other hosts see too.
        """CREATE TABLE volumes (
            name TEXT PRIMARY KEY,
            path TEXT NOT NULL
        )""",
    ),
    3: (
        # Host-wide settings as JSON documents (the replica server's first).
        """CREATE TABLE settings (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )""",
    ),
    4: (
        # Replication relationships (a JSON Relationship per VM, either role).
        """CREATE TABLE replications (
            vm_uuid TEXT PRIMARY KEY,
            doc TEXT NOT NULL,
            updated REAL NOT NULL
        )""",
        # Recovery points on a replica: ``stem`` names the files, one per disk
        # (``{stem}-disk{i}.qcow2`` in the relationship's storage dir).
        """CREATE TABLE recovery_points (
            vm_uuid TEXT NOT NULL,
            id INTEGER NOT NULL,
            time REAL NOT NULL,
            stem TEXT NOT NULL,
            size INTEGER NOT NULL,
            PRIMARY KEY (vm_uuid, id)
        )""",
        # What each cycle did, for health and statistics (pruned after a day).
        """CREATE TABLE cycles (
            vm_uuid TEXT NOT NULL,
            started REAL NOT NULL,
            kind TEXT NOT NULL,
            bytes INTEGER NOT NULL,
            duration_s REAL NOT NULL
        )""",
        "CREATE INDEX cycles_by_vm ON cycles (vm_uuid, started)",
    ),
    5: (
        # Extended replication: a replica host forwarding a VM's recovery
        # points to a third host (a JSON Extension per VM).
        """CREATE TABLE extensions (
            vm_uuid TEXT PRIMARY KEY,
            doc TEXT NOT NULL,
            updated REAL NOT NULL
        )""",
    ),
}
assert max(MIGRATIONS) == DATA_SCHEMA_VERSION
