"""The host's catalog: VMs and their states in SQLite (WAL) in the data dir.

The schema version is SQLite's ``user_version``. Opening applies every
forward migration (:mod:`ferry.adapters.catalog_schema`) in one transaction,
and refuses a catalog written by a newer ferry (see :func:`ferry.core.versions.check_data_schema`).
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from ferry.adapters.catalog_schema import MIGRATIONS
from ferry.core.relationship import Extension, Relationship
from ferry.core.replication import CycleRecord, PointInfo
from ferry.core.spec import VmSpec
from ferry.core.versions import DATA_SCHEMA_VERSION, check_data_schema
from ferry.core.vmstate import VmState
from ferry.errors import CatalogError, ConflictError, NotFoundError

CATALOG_FILE = "catalog.sqlite"


@dataclass(frozen=True)
class VmRecord:
    spec: VmSpec
    state: VmState
    created: float
    updated: float

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def uuid(self) -> str:
        return self.spec.uuid


@dataclass(frozen=True)
class JobRow:
    id: str
    kind: str
    vm_uuid: str
    vm_name: str
    state: str
    detail: str
    created: float
    updated: float


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _sql(
    operation: str,
) -> Callable[[Callable[Concatenate[Catalog, _P], _R]], Callable[Concatenate[Catalog, _P], _R]]:
    """Translate the ``sqlite3`` errors of one catalog method into :class:`CatalogError`.

    ``operation`` says what the method does ("record a VM's state"), for the
    message and the error's ``operation``. A unique name already taken is a
    :class:`ConflictError` raised by the method itself, where the name is known.
    """

    def wrap(
        method: Callable[Concatenate[Catalog, _P], _R],
    ) -> Callable[Concatenate[Catalog, _P], _R]:
        @functools.wraps(method)
        def run(self: Catalog, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return method(self, *args, **kwargs)
            except sqlite3.Error as exc:
                raise CatalogError(
                    f"cannot {operation} in the catalog {self.path}: {exc}", operation=operation
                ) from exc

        return run

    return wrap


class Catalog:
    """One host's catalog; a thin, typed layer over one SQLite connection.

    Every public method translates ``sqlite3`` errors (:func:`_sql`).
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / CATALOG_FILE
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate()
        except sqlite3.Error as exc:
            raise CatalogError(f"cannot open catalog {self.path}: {exc}") from exc

    @_sql("close the catalog")
    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        (found,) = self._db.execute("PRAGMA user_version").fetchone()
        check_data_schema(found, data_dir=str(self.path.parent))
        if found == DATA_SCHEMA_VERSION:
            return
        with self._transaction():
            for version in range(found + 1, DATA_SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version]:
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={DATA_SCHEMA_VERSION}")

    @property
    @_sql("read the schema version")
    def schema_version(self) -> int:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        return int(version)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @staticmethod
    def _record(row: tuple[str, str, float, float]) -> VmRecord:
        spec, state, created, updated = row
        return VmRecord(VmSpec.model_validate_json(spec), VmState(state), created, updated)

    @_sql("record a new VM")
    def add_vm(self, spec: VmSpec, state: VmState = VmState.OFF) -> VmRecord:
        now = time.time()
        try:
            self._db.execute(
                "INSERT INTO vms (uuid, name, spec, state, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (spec.uuid, spec.name, spec.model_dump_json(), state.value, now, now),
            )
        except sqlite3.IntegrityError as exc:
            raise ConflictError(f"a VM named {spec.name!r} already exists on this host") from exc
        except sqlite3.Error as exc:
            raise CatalogError(f"cannot record VM {spec.name!r}: {exc}") from exc
        return VmRecord(spec, state, now, now)

    @_sql("list VMs")
    def vms(self) -> list[VmRecord]:
        rows = self._db.execute(
            "SELECT spec, state, created, updated FROM vms ORDER BY name"
        ).fetchall()
        return [self._record(row) for row in rows]

    @_sql("look up a VM")
    def find(self, name: str) -> VmRecord | None:
        row = self._db.execute(
            "SELECT spec, state, created, updated FROM vms WHERE name = ? OR uuid = ?",
            (name, name),
        ).fetchone()
        return None if row is None else self._record(row)

    @_sql("look up a VM")
    def get(self, name: str) -> VmRecord:
        record = self.find(name)
        if record is None:
            raise NotFoundError(f"no VM named {name!r} on this host")
        return record

    @_sql("record a VM's state")
    def set_state(self, uuid: str, state: VmState) -> None:
        self._db.execute(
            "UPDATE vms SET state = ?, updated = ? WHERE uuid = ?",
            (state.value, time.time(), uuid),
        )

    @_sql("record a VM's configuration")
    def update_spec(self, spec: VmSpec) -> None:
        self._db.execute(
            "UPDATE vms SET spec = ?, updated = ? WHERE uuid = ?",
            (spec.model_dump_json(), time.time(), spec.uuid),
        )

    @_sql("delete a VM")
    def delete(self, uuid: str) -> None:
        self._db.execute("DELETE FROM vms WHERE uuid = ?", (uuid,))

    # -- jobs ----------------------------------------------------------------

    @_sql("record a job")
    def put_job(self, job: JobRow) -> None:
        """Insert or update a job (its ``detail`` is a JSON document)."""
        self._db.execute(
            "INSERT INTO jobs (id, kind, vm_uuid, vm_name, state, detail, created, updated) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
            "state = excluded.state, detail = excluded.detail, updated = excluded.updated",
            (job.id, job.kind, job.vm_uuid, job.vm_name, job.state, job.detail,
             job.created, time.time()),
        )  # fmt: skip

    @_sql("list jobs")
    def jobs(self) -> list[JobRow]:
        rows = self._db.execute(
            "SELECT id, kind, vm_uuid, vm_name, state, detail, created, updated "
            "FROM jobs ORDER BY created"
        ).fetchall()
        return [JobRow(*row) for row in rows]

    @_sql("look up a job")
    def job(self, job_id: str) -> JobRow | None:
        row = self._db.execute(
            "SELECT id, kind, vm_uuid, vm_name, state, detail, created, updated "
            "FROM jobs WHERE id = ?",
            (job_id,),
        ).fetchone()
        return None if row is None else JobRow(*row)

    # -- settings ------------------------------------------------------------

    @_sql("read a setting")
    def setting(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    @_sql("record a setting")
    def put_setting(self, key: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO settings (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # -- volumes -------------------------------------------------------------

    @_sql("list volumes")
    def volumes(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT name, path FROM volumes ORDER BY name").fetchall())

    @_sql("record a volume")
    def add_volume(self, name: str, path: str) -> None:
        try:
            self._db.execute("INSERT INTO volumes (name, path) VALUES (?, ?)", (name, path))
        except sqlite3.IntegrityError as exc:
            raise ConflictError(f"a volume named {name!r} already exists on this host") from exc

    @_sql("remove a volume")
    def remove_volume(self, name: str) -> None:
        if self._db.execute("DELETE FROM volumes WHERE name = ?", (name,)).rowcount == 0:
            raise NotFoundError(f"no volume named {name!r} on this host")

    # -- replication ---------------------------------------------------------

    @_sql("record a replication relationship")
    def put_relationship(self, rel: Relationship) -> None:
        self._db.execute(
            "INSERT INTO replications (vm_uuid, doc, updated) VALUES (?, ?, ?) "
            "ON CONFLICT(vm_uuid) DO UPDATE SET doc = excluded.doc, updated = excluded.updated",
            (rel.vm_uuid, rel.model_dump_json(), time.time()),
        )

    @_sql("look up a replication relationship")
    def relationship(self, vm_uuid: str) -> Relationship | None:
        row = self._db.execute(
            "SELECT doc FROM replications WHERE vm_uuid = ?", (vm_uuid,)
        ).fetchone()
        return None if row is None else Relationship.model_validate_json(row[0])

    @_sql("list replication relationships")
    def relationships(self) -> list[Relationship]:
        rows = self._db.execute("SELECT doc FROM replications ORDER BY vm_uuid").fetchall()
        return [Relationship.model_validate_json(doc) for (doc,) in rows]

    @_sql("delete a replication relationship")
    def delete_relationship(self, vm_uuid: str) -> None:
        with self._transaction():
            for table in ("replications", "recovery_points", "cycles"):
                self._db.execute(f"DELETE FROM {table} WHERE vm_uuid = ?", (vm_uuid,))

    @_sql("record an extended replication")
    def put_extension(self, ext: Extension) -> None:
        self._db.execute(
            "INSERT INTO extensions (vm_uuid, doc, updated) VALUES (?, ?, ?) "
            "ON CONFLICT(vm_uuid) DO UPDATE SET doc = excluded.doc, updated = excluded.updated",
            (ext.vm_uuid, ext.model_dump_json(), time.time()),
        )

    @_sql("look up an extended replication")
    def extension(self, vm_uuid: str) -> Extension | None:
        row = self._db.execute(
            "SELECT doc FROM extensions WHERE vm_uuid = ?", (vm_uuid,)
        ).fetchone()
        return None if row is None else Extension.model_validate_json(row[0])

    @_sql("list extended replications")
    def extensions(self) -> list[Extension]:
        rows = self._db.execute("SELECT doc FROM extensions ORDER BY vm_uuid").fetchall()
        return [Extension.model_validate_json(doc) for (doc,) in rows]

    @_sql("delete an extended replication")
    def delete_extension(self, vm_uuid: str) -> None:
        self._db.execute("DELETE FROM extensions WHERE vm_uuid = ?", (vm_uuid,))

    @_sql("record a recovery point")
    def add_point(self, vm_uuid: str, point: PointInfo) -> None:
        self._db.execute(
            "INSERT INTO recovery_points (vm_uuid, id, time, stem, size) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(vm_uuid, id) DO UPDATE SET time = excluded.time, "
            "stem = excluded.stem, size = excluded.size",
            (vm_uuid, point.id, point.time, point.file, point.size),
        )

    @_sql("list recovery points")
    def points(self, vm_uuid: str) -> list[PointInfo]:
        """Recovery points, oldest first."""
        rows = self._db.execute(
            "SELECT id, time, stem, size FROM recovery_points WHERE vm_uuid = ? ORDER BY id",
            (vm_uuid,),
        ).fetchall()
        return [PointInfo(id=i, time=t, file=stem, size=size) for i, t, stem, size in rows]

    @_sql("delete a recovery point")
    def delete_point(self, vm_uuid: str, point_id: int) -> None:
        self._db.execute(
            "DELETE FROM recovery_points WHERE vm_uuid = ? AND id = ?", (vm_uuid, point_id)
        )

    @_sql("record a replication cycle")
    def add_cycle(self, vm_uuid: str, cycle: CycleRecord, *, keep_s: float = 86400.0) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT INTO cycles (vm_uuid, started, kind, bytes, duration_s) "
                "VALUES (?, ?, ?, ?, ?)",
                (vm_uuid, cycle.started, cycle.kind, cycle.bytes, cycle.duration_s),
            )
            self._db.execute(
                "DELETE FROM cycles WHERE vm_uuid = ? AND started < ?",
                (vm_uuid, cycle.started - keep_s),
            )

    @_sql("replace a VM's replication cycles")
    def replace_cycles(self, vm_uuid: str, cycles: list[CycleRecord]) -> None:
        """The VM's whole cycle history is ``cycles`` (it moved here with it)."""
        with self._transaction():
            self._db.execute("DELETE FROM cycles WHERE vm_uuid = ?", (vm_uuid,))
            self._db.executemany(
                "INSERT INTO cycles (vm_uuid, started, kind, bytes, duration_s) "
                "VALUES (?, ?, ?, ?, ?)",
                [(vm_uuid, c.started, c.kind, c.bytes, c.duration_s) for c in cycles],
            )

    @_sql("list replication cycles")
    def cycles(self, vm_uuid: str, *, since: float | None = None) -> list[CycleRecord]:
        """The VM's cycles, oldest first; ``since``: only those started after it."""
        rows = self._db.execute(
            "SELECT started, kind, bytes, duration_s FROM cycles WHERE vm_uuid = ? "
            "AND started > ? ORDER BY started",
            (vm_uuid, float("-inf") if since is None else since),
        ).fetchall()
        return [CycleRecord(started=s, ok=k == "success", kind=k, bytes=b, duration_s=d)
                for s, k, b, d in rows]  # fmt: skip
