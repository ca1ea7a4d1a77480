"""The plan file: round trip, edits detected, bad files refused, stale inventories described."""

from __future__ import annotations

import json

import pytest

from ferry.core.plan.plan_file import (
    HostFacts,
    Inventory,
    Option,
    Plan,
    Preconditions,
    Step,
    StorageKind,
    VmFacts,
    dumps,
    inventory_changes,
    loads,
)
from ferry.errors import InvalidInputError

M = 1024**2


def _plan() -> Plan:
    vm = VmFacts(name="a", uuid="u-a", host="host-1", state="running", memory=256 * M,
                 config_version=2, storage=StorageKind.LOCAL, dirty_rate_bps=1e6)  # fmt: skip
    hosts = [HostFacts(name=h, url=f"https://127.0.0.1:{n}", functional_level=2,
                       memory=4096 * M, free_memory=2048 * M)
             for n, h in ((1, "host-1"), (2, "host-2"))]  # fmt: skip
    step = Step(order=1, vm="a", option=Option.LIVE_MIGRATION, reason="standalone host",
                estimate_s=3.5, downtime_s=0.2, source="host-1", destination="host-2",
                storage="copy",
                preconditions=Preconditions(vm_uuid="u-a", vm_host="host-1", config_version=2,
                                            state="running", must_be_running=True))  # fmt: skip
    inv = Inventory(taken="2026-12-02T00:00:00Z", hosts=hosts, vms=[vm])
    return Plan(created="2026-12-02T00:00:00Z", sources=["host-1"], destinations=["host-2"],
                inventory=inv, steps=[step])  # fmt: skip


def test_round_trip_keeps_every_field() -> None:
    plan = _plan()
    back = loads(dumps(plan))
    assert back.steps == plan.steps
    assert back.inventory == plan.inventory
    assert back.digest.startswith("sha256:")
    doc = json.loads(dumps(plan))
    for key in ("vm", "option", "reason", "estimate_s", "downtime_s", "order"):
        assert key in doc["steps"][0]
    assert set(doc) >= {"created", "inventory", "steps"}


def test_an_edit_is_detected() -> None:
    doc = json.loads(dumps(_plan()))
    doc["steps"][0]["destination"] = "host-3"
    with pytest.raises(InvalidInputError, match="was edited"):
        loads(json.dumps(doc))


@pytest.mark.parametrize(
    ("text", "match"),
    [("not json", "is not JSON"), ("[1]", "not a ferry plan"),
     ('{"format": "ferry-plan", "version": 9}', "version 9")],
)  # fmt: skip
def test_bad_files_are_one_line(text: str, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match) as info:
        loads(text)
    assert "\n" not in str(info.value)


def test_inventory_changes_name_what_changed() -> None:
    plan = _plan()
    assert inventory_changes(plan, plan.inventory) == []
    vm = plan.inventory.vms[0].model_copy(update={"host": "host-2", "config_version": 3,
                                                  "state": "off"})  # fmt: skip
    now = plan.inventory.model_copy(update={"vms": [vm], "hosts": plan.inventory.hosts[:1]})
    changes = inventory_changes(plan, now)
    assert any("on 'host-2' now" in c for c in changes)
    assert any("config version 3" in c for c in changes)
    assert any("is off, not running" in c for c in changes)
    assert any("host 'host-2' is gone" in c for c in changes)
    gone = plan.inventory.model_copy(update={"vms": []})
    assert inventory_changes(plan, gone) == ["VM 'a' is gone"]
