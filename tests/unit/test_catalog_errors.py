"""The catalog's SQLite errors reach callers as FerryErrors that name the operation."""

from __future__ import annotations

import inspect
import sqlite3
from pathlib import Path

import pytest

from ferry.adapters.catalog import Catalog
from ferry.core.spec import VmSpec
from ferry.errors import CatalogError, ConflictError


def _public_methods() -> list[str]:
    names = []
    for name, member in vars(Catalog).items():
        if name.startswith("_"):
            continue
        target = member.fget if isinstance(member, property) else member
        if inspect.isfunction(target):
            names.append(name)
    return names


def test_every_public_method_translates_sqlite_errors() -> None:
    """A new method without ``@_sql(...)`` would leak sqlite3 errors as "internal error"."""
    bare = []
    for name in _public_methods():
        member = vars(Catalog)[name]
        target = member.fget if isinstance(member, property) else member
        if not hasattr(target, "__wrapped__"):
            bare.append(name)
    assert bare == [], f"Catalog methods without @_sql(...): {bare}"


def test_a_failing_database_is_a_catalog_error_naming_the_operation(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path)
    catalog.close()
    with pytest.raises(CatalogError) as caught:
        catalog.vms()
    assert caught.value.operation == "list VMs"
    assert "cannot list VMs in the catalog" in str(caught.value)
    assert isinstance(caught.value.__cause__, sqlite3.Error)


def test_a_locked_database_is_a_catalog_error(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path)
    holder = sqlite3.connect(tmp_path / "catalog.sqlite", isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        catalog._db.execute("PRAGMA busy_timeout=0")  # fail at once instead of in 5 s
        with pytest.raises(CatalogError) as caught:
            catalog.put_setting("k", "v")
        assert caught.value.operation == "record a setting"
        assert "locked" in str(caught.value)
    finally:
        holder.close()
        catalog.close()


def test_a_name_taken_is_a_conflict(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path)
    try:
        catalog.add_vm(VmSpec(name="web", config_version=3, memory=64 * 1024**2))
        with pytest.raises(ConflictError, match="'web' already exists"):
            catalog.add_vm(VmSpec(name="web", config_version=3, memory=64 * 1024**2))
        catalog.add_volume("shared", "/srv/shared")
        with pytest.raises(ConflictError, match="'shared' already exists"):
            catalog.add_volume("shared", "/srv/other")
    finally:
        catalog.close()
