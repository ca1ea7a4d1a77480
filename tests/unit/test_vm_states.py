"""The one writer of VM states, against a real SQLite catalog; and the guard
that nothing else writes them."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.adapters.catalog import Catalog
from ferry.core.spec import VmSpec
from ferry.core.vmstate import VmOp, VmState
from ferry.errors import NotFoundError, StateError
from ferry.host.vms.states import VmStates

SRC = Path(__file__).resolve().parents[2] / "src" / "ferry"
WRITER = SRC / "host" / "vms" / "states.py"
LINE = re.compile(r"state (\S+) -> (\S+) by (\S+) \(vm (\S+)\)")


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    catalog = Catalog(tmp_path)
    yield catalog
    catalog.close()


def test_only_the_writer_calls_set_state() -> None:
    callers = [
        f"{path.relative_to(SRC)}:{number}"
        for path in SRC.rglob("*.py")
        if path != WRITER
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if ".set_state(" in line
    ]
    assert callers == [], "VM states change only through VmStates.apply (vms/states.py)"


def test_apply_reads_the_catalog_not_the_callers_copy(
    catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    stale = catalog.add_vm(VmSpec(name="web", config_version=1, memory=128 * 1024**2))
    states = VmStates(catalog)
    caplog.set_level(logging.INFO, logger="ferry.host.vms.states")
    for op in (VmOp.START, VmOp.STARTED, VmOp.MIGRATE, VmOp.MIGRATE_ABORTED):
        states.apply(stale, op)  # ``stale`` still says off
    assert catalog.get("web").state is VmState.RUNNING
    steps = [LINE.search(r.getMessage()).groups() for r in caplog.records]  # type: ignore[union-attr]
    assert steps == [
        ("off", "starting", "start", stale.uuid),
        ("starting", "running", "started", stale.uuid),
        ("running", "migrating", "migrate", stale.uuid),
        ("migrating", "running", "migrate-aborted", stale.uuid),
    ]


def test_an_operation_in_the_wrong_state_writes_nothing(catalog: Catalog) -> None:
    record = catalog.add_vm(VmSpec(name="web", config_version=1, memory=128 * 1024**2))
    with pytest.raises(StateError) as info:
        VmStates(catalog).apply(record.uuid, VmOp.PAUSE)
    assert info.value.state is VmState.OFF and info.value.required == (VmState.RUNNING,)
    assert catalog.get("web").state is VmState.OFF


def test_an_operation_that_keeps_the_state_is_not_logged_as_a_change(
    catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    record = catalog.add_vm(VmSpec(name="web", config_version=1, memory=128 * 1024**2),
                            VmState.RUNNING)  # fmt: skip
    caplog.set_level(logging.INFO, logger="ferry.host.vms.states")
    assert VmStates(catalog).apply(record, VmOp.OBSERVED_RUNNING) is VmState.RUNNING
    assert not [r for r in caplog.records if LINE.search(r.getMessage())]


def test_a_vm_that_is_gone_cannot_change(catalog: Catalog) -> None:
    with pytest.raises(NotFoundError):
        VmStates(catalog).apply("0000", VmOp.START)
