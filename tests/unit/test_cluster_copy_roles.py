"""The rules of Copy Cluster Roles (ferry.core.cluster.copy_roles)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from ferry.core.cluster.copy_roles import (
    CopyRecord,
    CopyVm,
    NodeFacts,
    Phase,
    Step,
    check_request,
    check_step,
    check_vms,
    downtime_s,
    pick,
    record_key,
    report,
    start_refusal,
)
from ferry.core.cluster.keys import ClusterKeys
from ferry.core.cpu_models import CpuFacts, CpuModel
from ferry.errors import ConflictError, InvalidInputError, NotFoundError, StateError, VersionError

MIB = 1 << 20
VMS = [
    CopyVm("web", "u1", "csv1", 1, 128 * MIB, node="host-1", state="running",
           networks=("lan",), replica="host-9"),
    CopyVm("db", "u2", "csv1", 1, 128 * MIB, node="host-2", state="off"),
    CopyVm("other", "u3", "csv2", 1, 128 * MIB, node="host-1", state="running"),
]  # fmt: skip


@dataclass(frozen=True)
class Node:
    name: str
    state: str = "up"
    functional_level: int = 2
    memory_free: int = 1024 * MIB


def test_request_refusals() -> None:
    known, volumes = ["c1", "c2"], {"csv1": "/v"}
    check_request(source="c1", target="c2", volume="csv1", known=known, target_volumes=volumes)
    with pytest.raises(InvalidInputError, match=r"--from and --to are both 'c1'"):
        check_request(source="c1", target="c1", volume="csv1", known=known,
                      target_volumes=volumes)  # fmt: skip
    with pytest.raises(NotFoundError, match=r"unknown cluster 'c9' \(clusters in this etcd: c1"):
        check_request(source="c9", target="c2", volume="csv1", known=known,
                      target_volumes=volumes)  # fmt: skip
    with pytest.raises(NotFoundError, match=r"unknown cluster 'c8'"):
        check_request(source="c1", target="c8", volume="csv1", known=known,
                      target_volumes=volumes)  # fmt: skip
    with pytest.raises(NotFoundError, match=r"cluster 'c2' has no volume 'csv9' \(volumes: "
                       r"csv1\): add it with 'ferry cluster volume add csv9"):  # fmt: skip
        check_request(source="c1", target="c2", volume="csv9", known=known,
                      target_volumes=volumes)  # fmt: skip


def test_one_vm_picks_its_whole_volume_and_the_note_says_so() -> None:
    chosen, note = pick("csv1", VMS)
    assert [vm.name for vm in chosen] == ["db", "web"]
    assert note == "every VM on volume 'csv1': db, web"
    chosen, note = pick("ignored", VMS, asked="web")
    assert [vm.name for vm in chosen] == ["db", "web"]
    assert "VM 'web' picks every VM on its volume 'csv1'" in note and "db, web" in note
    with pytest.raises(NotFoundError, match="no VM of the source cluster is on volume 'csv7'"):
        pick("csv7", VMS)
    with pytest.raises(NotFoundError, match="no VM 'nope'"):
        pick("csv1", VMS, asked="nope")


def record(phase: Phase, source: str = "c1") -> CopyRecord:
    return CopyRecord(source, "c2", "csv1", phase, 10.0, tuple(VMS[:2]))


def test_steps_follow_each_other() -> None:
    check_step(Step.TEST, source="c1", volume="csv1", record=None)
    check_step(Step.TEST, source="c1", volume="csv1", record=record(Phase.TESTED))  # again
    check_step(Step.TEST, source="c1", volume="csv1", record=record(Phase.ROLLED_BACK))
    check_step(Step.RUN, source="c1", volume="csv1", record=record(Phase.TESTED))
    check_step(Step.ROLLBACK, source="c1", volume="csv1", record=record(Phase.RAN))
    with pytest.raises(StateError, match=r"--run needs a --test of volume 'csv1' first: "):
        check_step(Step.RUN, source="c1", volume="csv1", record=None)
    with pytest.raises(StateError, match=r"first \(its last step was rolled-back\)"):
        check_step(Step.RUN, source="c1", volume="csv1", record=record(Phase.ROLLED_BACK))
    with pytest.raises(StateError, match="first \\(its last step was ran\\)"):
        check_step(Step.RUN, source="c1", volume="csv1", record=record(Phase.RAN))
    for phase in (None, Phase.TESTED, Phase.ROLLED_BACK):
        with pytest.raises(StateError, match="nothing to roll back for volume 'csv1'"):
            check_step(Step.ROLLBACK, source="c1", volume="csv1",
                       record=None if phase is None else record(phase))  # fmt: skip
    with pytest.raises(StateError, match="copied already \\(--run\\): --rollback first"):
        check_step(Step.TEST, source="c1", volume="csv1", record=record(Phase.RAN))
    with pytest.raises(ConflictError, match="copied from cluster 'c3', not 'c1'"):
        check_step(Step.RUN, source="c1", volume="csv1", record=record(Phase.TESTED, "c3"))
    copied = dataclasses.replace(record(Phase.RAN), copied=True)
    assert CopyRecord.from_json(copied.to_json()) == copied
    check_step(Step.ROLLBACK, source="c1", volume="csv1", record=copied)  # copied back


def test_vm_refusals_migrating_and_version_rule() -> None:
    check_vms(VMS, target="c2", level=1)
    moving = [VMS[0], CopyVm("db", "u2", "csv1", 1, MIB, migrating=True)]
    with pytest.raises(ConflictError, match="VM 'db' of the volume is migrating right now"):
        check_vms(moving, target="c2", level=2)
    newer = [CopyVm("new", "u4", "csv1", 3, MIB)]
    with pytest.raises(VersionError, match=r"'c2' is at functional level 2, below VM 'new'.*"
                       r"version 3: raise it with 'ferry cluster upgrade-level c2'"):  # fmt: skip
        check_vms(newer, target="c2", level=2)


def test_record_round_trip_and_ownership() -> None:
    ran = record(Phase.RAN)
    assert CopyRecord.from_json(ran.to_json()) == ran
    assert record_key(ClusterKeys("c2"), "csv1") == "/ferry/clusters/c2/copy-roles/csv1"
    line = start_refusal("web", "u1", "c1", [ran])
    assert line is not None and "belongs to cluster 'c2'" in line and "--rollback" in line
    assert start_refusal("web", "u1", "c2", [ran]) is None  # C2 may start it
    assert start_refusal("other", "u3", "c1", [ran]) is None  # not of the volume
    assert start_refusal("web", "u1", "c1", [record(Phase.TESTED)]) is None


def facts(node: str, networks: tuple[str, ...] | None, models: tuple[str, ...] = ("max",),
          *, denied: tuple[str, ...] = ()) -> NodeFacts:  # fmt: skip
    """A node's hello: its runnable CPU models, and ``denied`` ones host.toml leaves out."""
    cpus = tuple(CpuModel(name=m, runnable=True) for m in models) + tuple(
        CpuModel(name=m, runnable=False, allowed=False) for m in denied)  # fmt: skip
    return NodeFacts(CpuFacts(host=node, models=cpus),
                     None if networks is None else frozenset(networks))  # fmt: skip


def test_report_checks_levels_cpus_networks_capacity_replication() -> None:
    chosen, note = pick("csv1", VMS)
    nodes = [Node("host-3"), Node("host-4", memory_free=64 * MIB)]
    both = {"host-3": facts("host-3", ("lan2",)), "host-4": facts("host-4", ("lan2", "x"))}
    shown = report(chosen, source="c1", target="c2", volume="csv1", level=2, nodes=nodes,
                   network_map={"lan": "lan2"}, facts=both, note=note)  # fmt: skip
    assert shown["ok"] and shown["picked"] == note
    assert shown["checked_nodes"] == ["host-3", "host-4"] and shown["unanswered"] == {}
    rows = {r["name"]: r for r in shown["vms"]}
    assert rows["web"]["networks"] == {"lan": "lan2"} and rows["web"]["replication"] == "host-9"
    assert {r["target_node"] for r in rows.values()} == {"host-3"}  # only host-3 has room
    assert rows["web"]["state"] == "running" and rows["db"]["state"] == "off"
    # No map: lan is missing in C2. A CPU model C2 lacks. A node too small for both.
    picky = [CopyVm("web", "u1", "csv1", 1, 128 * MIB, networks=("lan",), cpu_model="EPYC"),
             CopyVm("db", "u2", "csv1", 3, 900 * MIB)]  # fmt: skip
    shown = report(picky, source="c1", target="c2", volume="csv1", level=2,
                   nodes=[Node("host-3", memory_free=950 * MIB)], network_map={},
                   facts={"host-3": facts("host-3", ("lan2",))})  # fmt: skip
    rows = {r["name"]: r for r in shown["vms"]}
    assert not shown["ok"]
    assert rows["web"]["missing_networks"] == ["lan"] and not rows["web"]["cpu_ok"]
    assert "host 'host-3' has no CPU model 'EPYC'" in rows["web"]["cpu_refusals"]["host-3"]
    assert not rows["db"]["level_ok"] and rows["db"]["capacity"] != "fits", rows["db"]


def test_report_wants_each_cpu_model_and_network_on_every_node_that_answered() -> None:
    vm = [CopyVm("web", "u1", "csv1", 1, 128 * MIB, networks=("lan", "dmz"), cpu_model="max")]
    nodes = [Node("host-3"), Node("host-4"), Node("host-5")]
    said = {"host-3": facts("host-3", ("lan", "dmz")),
            "host-4": facts("host-4", ("lan",), models=(), denied=("max",)),
            "host-5": facts("host-5", None)}  # fmt: skip
    shown = report(vm, source="c1", target="c2", volume="csv1", level=2, nodes=nodes,
                   network_map={}, facts=said, unanswered={"host-6": "timed out"})  # fmt: skip
    row = shown["vms"][0]
    assert not shown["ok"] and not row["ok"]
    # host-4 lacks dmz; host-5 did not say (older host): nothing refused on it.
    assert row["missing_networks"] == ["dmz"] and row["missing_on"] == {"dmz": ["host-4"]}
    assert list(row["cpu_refusals"]) == ["host-4"], row["cpu_refusals"]
    assert "host.toml cpu_models allows only none" in row["cpu_refusals"]["host-4"]
    assert shown["unanswered"] == {"host-6": "timed out"}
    # The same VM where every node has both: ok, whatever an unanswered node is.
    fine = {"host-3": facts("host-3", ("lan", "dmz")), "host-5": facts("host-5", None)}
    again = report(vm, source="c1", target="c2", volume="csv1", level=2, nodes=nodes,
                   network_map={}, facts=fine, unanswered={"host-6": "timed out"})  # fmt: skip
    assert again["ok"] and again["vms"][0]["missing_on"] == {}


def test_downtime() -> None:
    assert downtime_s(100.0, 101.2345) == 1.234
    assert downtime_s(100.0, 99.0) == 0.0
