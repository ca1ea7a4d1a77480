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


def _off_plan() -> Plan:
    """The plan of _plan with its VM off and planned as export/import."""
    plan = _plan()
    off = plan.inventory.vms[0].model_copy(update={"state": "off"})
    pre = plan.steps[0].preconditions.model_copy(update={"state": "off",
                                                         "must_be_running": False})  # fmt: skip
    step = plan.steps[0].model_copy(update={"option": Option.EXPORT_IMPORT, "storage": None,
                                            "preconditions": pre})  # fmt: skip
    inv = plan.inventory.model_copy(update={"vms": [off]})
    return plan.model_copy(update={"inventory": inv, "steps": [step]})


def test_a_state_change_of_a_steps_vm_is_a_change() -> None:
    plan = _off_plan()
    assert inventory_changes(plan, plan.inventory) == []
    started = plan.inventory.vms[0].model_copy(update={"state": "running"})
    now = plan.inventory.model_copy(update={"vms": [started]})
    assert inventory_changes(plan, now) == ["VM 'a' is running now, not off as planned"]
    # running -> off on a live step: said once.
    live = _plan()
    stopped = live.inventory.vms[0].model_copy(update={"state": "off"})
    now = live.inventory.model_copy(update={"vms": [stopped]})
    assert inventory_changes(live, now) == ["VM 'a' is off, not running"]
    # running -> off on a step that does not need it running is still a change.
    plan = _off_plan()
    pre = plan.steps[0].preconditions.model_copy(update={"state": "running"})
    planned_running = plan.model_copy(update={
        "steps": [plan.steps[0].model_copy(update={"preconditions": pre})]})  # fmt: skip
    assert inventory_changes(planned_running, plan.inventory) == [
        "VM 'a' is off now, not running as planned"]  # fmt: skip


def test_a_vm_new_on_a_source_host_is_a_change() -> None:
    plan = _plan()
    new = VmFacts(name="x", uuid="u-x", host="host-1", state="off", memory=128 * M,
                  config_version=2, storage=StorageKind.LOCAL)  # fmt: skip
    now = plan.inventory.model_copy(update={"vms": [*plan.inventory.vms, new]})
    assert inventory_changes(plan, now) == ["VM 'x' is new on host-1"]
    # New on a destination host only: not the plan's business (capacity is checked apart).
    there = new.model_copy(update={"host": "host-2"})
    now = plan.inventory.model_copy(update={"vms": [*plan.inventory.vms, there]})
    assert inventory_changes(plan, now) == []
    # A source named as a cluster covers its hosts.
    hosts = [h.model_copy(update={"cluster": "c1"}) if h.name == "host-1" else h
             for h in plan.inventory.hosts]  # fmt: skip
    by_cluster = plan.model_copy(update={
        "sources": ["cluster:c1"], "steps": [],
        "inventory": plan.inventory.model_copy(update={"hosts": hosts})})  # fmt: skip
    now = by_cluster.inventory.model_copy(update={"vms": [*plan.inventory.vms, new]})
    assert inventory_changes(by_cluster, now) == ["VM 'x' is new on host-1"]
