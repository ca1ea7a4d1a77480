"""Making a plan: options per deployment, replica site first, volumes together,
capacity at each step, warnings, policy, and the bad inputs that refuse a plan."""

from __future__ import annotations

import pytest

from ferry.core.plan.plan_file import (
    DiskFacts,
    HostFacts,
    Inventory,
    LinkFacts,
    Option,
    ReplicationFacts,
    StorageKind,
    VmFacts,
    dumps,
    loads,
)
from ferry.core.plan.planner import Targets, make_plan
from ferry.core.plan.policy import parse_policy
from ferry.errors import ConflictError, InvalidInputError

M = 1024**2
G = 1024**3
NOW = "2026-12-02T02:00:00Z"


def host(name: str, free: int = 8 * G, **kw: object) -> HostFacts:
    return HostFacts(name=name, url=f"https://127.0.0.1/{name}", functional_level=2,
                     supported_config_versions=(1, 3), memory=16 * G, free_memory=free,
                     **kw)  # type: ignore[arg-type]  # fmt: skip


def vm(name: str, on: str = "host-1", **kw: object) -> VmFacts:
    fields: dict[str, object] = dict(name=name, uuid=f"u-{name}", host=on, state="running",
                                     memory=256 * M, config_version=2, dirty_rate_bps=1.0 * M,
                                     storage=StorageKind.LOCAL,
                                     disks=[DiskFacts(path=f"/d/{name}", size=G,
                                                      allocation=64 * M)])  # fmt: skip
    fields.update(kw)
    return VmFacts(**fields)  # type: ignore[arg-type]


def inventory(vms: list[VmFacts], hosts: list[HostFacts] | None = None,
              bandwidth: float = 100.0 * M) -> Inventory:  # fmt: skip
    hosts = hosts or [host("host-1"), host("host-2")]
    links = [LinkFacts(src=a.name, dst=b.name, bandwidth_bps=bandwidth)
             for a in hosts for b in hosts if a is not b]  # fmt: skip
    return Inventory(taken=NOW, hosts=hosts, vms=vms, links=links)


ONE_TO_TWO = Targets(["host-1"], ["host-2"])


def test_standalone_running_vm_is_a_live_migration_with_its_disks_copied() -> None:
    plan = make_plan(inventory([vm("a")]), ONE_TO_TWO, created=NOW)
    (step,) = plan.steps
    assert (step.option, step.storage, step.source, step.destination) == (
        Option.LIVE_MIGRATION,
        "copy",
        "host-1",
        "host-2",
    )
    assert step.reason.startswith("standalone host: live migration yes")
    assert step.estimate_s > step.downtime_s > 0
    assert step.preconditions.must_be_running
    assert step.preconditions.destination_free_memory == 256 * M
    assert step.improvement is None and step.warnings == []
    assert loads(dumps(plan)).steps == plan.steps


def test_off_vm_is_export_import_without_downtime() -> None:
    (step,) = make_plan(inventory([vm("a", state="off", dirty_rate_bps=None)]), ONE_TO_TWO,
                        created=NOW).steps  # fmt: skip
    assert step.option is Option.EXPORT_IMPORT and step.downtime_s == 0
    assert step.preconditions.destination_free_memory == 0


def test_same_host_is_an_in_place_upgrade_with_vms_running() -> None:
    (step,) = make_plan(inventory([vm("a")]), Targets(["host-1"], ["host-1"]),
                        created=NOW).steps  # fmt: skip
    assert step.option is Option.IN_PLACE
    assert step.improvement == "in-place upgrade with VMs running"


def test_shared_volume_the_destination_sees_is_not_copied() -> None:
    vols = {"shared": "/srv/shared"}
    hosts = [host("host-1", volumes=vols), host("host-2", volumes=vols)]
    a = vm("a", storage=StorageKind.HOST_VOLUME, volume="shared",
           disks=[DiskFacts(path="/srv/shared/a", size=G, volume="shared",
                            storage=StorageKind.HOST_VOLUME)])  # fmt: skip
    (step,) = make_plan(inventory([a], hosts), ONE_TO_TWO, created=NOW).steps
    assert step.storage == "shared" and step.group == "host-1/shared"


def test_clustered_vm_leaving_for_another_cluster_is_marked_as_ferry_improvement() -> None:
    hosts = [host("host-1", cluster="c1", volumes={"csv1": "/c1"}),
             host("host-2", cluster="c2", volumes={"csv1": "/c2"})]  # fmt: skip
    a = vm("a", cluster="c1", storage=StorageKind.CLUSTER_VOLUME, volume="csv1",
           disks=[DiskFacts(path="/c1/a", size=G, volume="csv1",
                            storage=StorageKind.CLUSTER_VOLUME)])  # fmt: skip
    targets = Targets(["host-1"], ["host-2"], ["c2"], ["cluster:c1"], ["cluster:c2"])
    (step,) = make_plan(inventory([a], hosts), targets, created=NOW).steps
    assert step.option is Option.LIVE_MIGRATION and step.storage == "copy"
    assert step.reason.startswith("cluster with shared volumes (CSV): live migration yes, "
                                  "copying its disks during the move (")  # fmt: skip
    assert step.improvement == "live migration without leaving the cluster"
    assert step.destination_cluster == "c2"
    # Marked as a cluster destination, so apply can tell it from a move to a host.
    assert "ferry vm move --to-cluster (issue 13)" in step.reason


def test_clustered_vm_going_to_a_standalone_host_leaves_its_cluster() -> None:
    hosts = [host("host-1", cluster="c1", volumes={"csv1": "/c1"}), host("host-2")]
    a = vm("a", cluster="c1", storage=StorageKind.CLUSTER_VOLUME, volume="csv1",
           disks=[DiskFacts(path="/c1/a", size=G, volume="csv1",
                            storage=StorageKind.CLUSTER_VOLUME)])  # fmt: skip
    (step,) = make_plan(inventory([a], hosts), ONE_TO_TWO, created=NOW).steps
    assert step.option is Option.LIVE_MIGRATION and step.storage == "copy"
    assert step.reason.startswith("cluster with shared volumes (CSV): live migration yes, "
                                  "after removing the VM from its cluster, copying its disks "
                                  "during the move")  # fmt: skip
    assert step.improvement is None and "ferry improvement" not in step.reason
    assert step.destination_cluster is None


def test_replica_site_moves_first_and_the_primary_waits_for_it() -> None:
    hosts = [host(f"host-{i}") for i in (1, 2, 3, 4)]
    primary = vm("a", replication=ReplicationFacts(role="primary", partners=["host-3"]))
    replica = vm("a", on="host-3", state="replica", dirty_rate_bps=None,
                 replication=ReplicationFacts(role="replica", partners=["host-1"]))  # fmt: skip
    other = vm("b")
    targets = Targets(["host-1", "host-3"], ["host-2", "host-4"])
    plan = make_plan(inventory([primary, other, replica], hosts), targets, created=NOW)
    order = [(s.vm, s.option, s.source) for s in plan.steps]
    assert order[0] == ("a", Option.MOVE_REPLICA, "host-3")
    assert plan.steps[0].reason.startswith("replication in use: move the replica site first")
    a_step = next(s for s in plan.steps if s.vm == "a" and not s.preconditions.replica)
    assert a_step.preconditions.after == [1]
    # the primary does not land where its replica went
    assert a_step.destination != plan.steps[0].destination
    assert all(not s.warnings for s in plan.steps)


def test_a_volumes_vms_go_together() -> None:
    vols = {"v": "/v"}
    hosts = [host("host-1", volumes=vols), host("host-2", volumes=vols)]

    def on_volume(name: str) -> VmFacts:
        return vm(name, storage=StorageKind.HOST_VOLUME, volume="v",
                  disks=[DiskFacts(path=f"/v/{name}", size=G, volume="v",
                                   storage=StorageKind.HOST_VOLUME)])  # fmt: skip

    plan = make_plan(inventory([vm("a"), on_volume("z1"), vm("m"), on_volume("b1")], hosts),
                     ONE_TO_TWO, created=NOW)  # fmt: skip
    names = [s.vm for s in plan.steps]
    assert abs(names.index("z1") - names.index("b1")) == 1


def test_capacity_is_respected_at_each_step_across_destinations() -> None:
    hosts = [host("host-1"), host("host-2", free=600 * M), host("host-3", free=300 * M)]
    vms = [vm(n) for n in ("a", "b", "c")]
    plan = make_plan(inventory(vms, hosts), Targets(["host-1"], ["host-2", "host-3"]),
                     created=NOW)  # fmt: skip
    assert sorted(s.destination for s in plan.steps) == ["host-2", "host-2", "host-3"]


def test_destination_without_capacity_is_one_line() -> None:
    hosts = [host("host-1"), host("host-2", free=300 * M)]
    with pytest.raises(ConflictError, match="destination lacks capacity: VM 'b' needs 256M") \
            as info:  # fmt: skip
        make_plan(inventory([vm("a"), vm("b")], hosts), ONE_TO_TWO, created=NOW)
    assert "\n" not in str(info.value)


def test_unknown_host_is_one_line() -> None:
    with pytest.raises(InvalidInputError, match="host 'host-9' is not in the inventory"):
        make_plan(inventory([vm("a")]), Targets(["host-1"], ["host-9"]), created=NOW)


def test_warnings_convergence_network_cpu_window() -> None:
    hosts = [host("host-1"), host("host-2", networks=["lab"], cpu_models=["max"])]
    hot = vm("hot", dirty_rate_bps=500.0 * M)
    wired = vm(
        "wired",
        networks=["prod"],
        cpu_model="Haswell-v4",
        disks=[DiskFacts(path="/d/w", size=20 * G, allocation=10 * G)],
    )
    policy = parse_policy('window = "01:00-01:01"')
    plan = make_plan(inventory([hot, wired], hosts, bandwidth=100.0 * M), ONE_TO_TWO, policy,
                     created=NOW)  # fmt: skip
    warn = {s.vm: " | ".join(s.warnings) for s in plan.steps}
    options = {s.vm: s.option for s in plan.steps}
    # live migration would not converge: export/import is planned, and the plan says why
    assert options["hot"] is Option.EXPORT_IMPORT
    assert "will not converge: it dirties 500 MiB/s and the link carries 100 MiB/s" in warn["hot"]
    assert "(so not live-migration)" in warn["hot"]
    assert "lacks network 'prod'" in warn["wired"]
    assert "past its window 01:00-01:01 (1m00s)" in warn["wired"]
    hosts = [host("host-1"), host("host-2", networks=["prod"], cpu_models=["max"])]
    plan = make_plan(inventory([wired], hosts), ONE_TO_TWO, created=NOW)
    assert "cannot run CPU model 'Haswell-v4'" in plan.steps[0].warnings[0]


def test_policy_max_downtime_and_must_run() -> None:
    hot = vm("hot", dirty_rate_bps=500.0 * M)
    policy = parse_policy('[[vm]]\nmatch = "hot"\nmust-run = true')
    (step,) = make_plan(inventory([hot]), ONE_TO_TWO, policy, created=NOW).steps
    # nothing that keeps it running converges: planned anyway, with the reason
    assert step.option is Option.LIVE_MIGRATION
    assert any("no option meets its needs" in w for w in step.warnings)
    calm = vm("calm")
    strict = parse_policy('[[vm]]\nmatch = "calm"\nmax-downtime = "1ms"')
    (step,) = make_plan(inventory([calm]), ONE_TO_TWO, strict, created=NOW).steps
    assert any("over the policy's max-downtime" in w for w in step.warnings)
    assert policy.source is not None


def test_copy_cluster_roles_takes_the_whole_volume_along() -> None:
    hosts = [host("host-1", cluster="c1", volumes={"csv1": "/c1"}),
             host("host-2", cluster="c2", volumes={"csv1": "/c2"})]  # fmt: skip

    def on_csv(name: str, **kw: object) -> VmFacts:
        return vm(name, cluster="c1", storage=StorageKind.CLUSTER_VOLUME, volume="csv1",
                  disks=[DiskFacts(path=f"/c1/{name}", size=G, allocation=64 * M,
                                   volume="csv1", storage=StorageKind.CLUSTER_VOLUME)],
                  **kw)  # fmt: skip

    # z (2G) dirties more than the link carries and may be down 5 s at most: live
    # migration would not converge even so; Copy Cluster Roles is brief enough
    vms = [on_csv("b"), on_csv("z", dirty_rate_bps=500.0 * M, memory=2 * G)]
    policy = parse_policy('[[vm]]\nmatch = "z"\nmax-downtime = "5s"')
    targets = Targets(["host-1"], ["host-2"], ["c2"], ["cluster:c1"], ["cluster:c2"])
    plan = make_plan(inventory(vms, hosts), targets, policy, created=NOW)
    steps = {s.vm: s for s in plan.steps}
    assert steps["z"].option is Option.COPY_CLUSTER_ROLES
    assert steps["z"].improvement == "replication kept across Copy Cluster Roles"
    # b came first and would have gone live; it goes with its volume instead
    assert steps["b"].option is Option.COPY_CLUSTER_ROLES
    assert steps["b"].reason.endswith("moves with its volume")
    assert steps["b"].group == steps["z"].group == "c1/csv1"
    assert [s.vm for s in plan.steps] == ["b", "z"]
