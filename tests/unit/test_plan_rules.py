"""The rule table reproduces the reference's tables (DESIGN.md section 1) cell by cell."""

from __future__ import annotations

import pytest

from ferry.core.plan.plan_file import Option
from ferry.core.plan.rules import (
    FITS,
    IMPROVEMENTS,
    OPTIONS,
    SITE_ORDER,
    UNREPLICATED_RANK,
    Deployment,
    DestinationKind,
    Downtime,
    ReplicationFate,
    Scope,
    effective,
    improvement_for,
    reason,
)

D = Deployment
O = Option  # noqa: E741
K = DestinationKind
ANY = frozenset(K)

# "Which option fits which deployment", as the reference writes each cell.
FIT_CELLS = {
    D.STANDALONE: {O.IN_PLACE: "yes", O.EXPORT_IMPORT: "yes", O.LIVE_MIGRATION: "yes",
                   O.COPY_CLUSTER_ROLES: "no"},
    D.CLUSTER_SHARED_VOLUMES: {
        O.IN_PLACE: "no", O.EXPORT_IMPORT: "yes",
        O.LIVE_MIGRATION: "yes, after removing the VM from its cluster, copying its disks "
                          "during the move",
        O.COPY_CLUSTER_ROLES: "yes"},
    D.CLUSTER_FILE_SERVER: {
        O.IN_PLACE: "no", O.EXPORT_IMPORT: "yes",
        O.LIVE_MIGRATION: "yes, after removing the VM from its cluster",
        O.COPY_CLUSTER_ROLES: "yes"},
}  # fmt: skip

# "Migration options": (what it gives, what it costs), as the reference writes them.
OPTION_CELLS = {
    O.IN_PLACE: ("no new hardware", "VMs off during the upgrade"),
    O.LIVE_MIGRATION: (
        "VMs keep running; with disks on a share both hosts see, only config and memory "
        "move; cluster-to-cluster moves with no downtime; single VMs of a cluster",
        "needs a second host or spare capacity; time grows with memory size and network; "
        "without shared storage the disks must be copied too (shared-nothing); the VM "
        "leaves its source cluster first and gets high availability again only after it "
        "lands, so it is unprotected during the move"),
    O.COPY_CLUSTER_ROLES: (
        "moves a whole cluster's roles to a new cluster; can be tested without touching "
        "production; can be reversed; copies test-cluster roles to production",
        "all VMs on one shared volume move together; VMs are down briefly; replication "
        "settings are not copied (they must be re-enabled, using the VM already on the "
        "replica as the initial copy); needs new hardware"),
    O.EXPORT_IMPORT: (
        "one VM at a time; the admin controls how the files travel",
        "VM is off during export/import; needs new hardware; import drops the VM's "
        "replication settings (re-enable using the existing replica VM as initial copy)"),
}  # fmt: skip

# The facts the planner reads out of each option's cells.
OPTION_FACTS = {
    O.IN_PLACE: (Downtime.OFF, False, Scope.HOST, ReplicationFate.KEPT, False),
    O.LIVE_MIGRATION: (Downtime.NONE, True, Scope.VM, ReplicationFate.KEPT, True),
    O.COPY_CLUSTER_ROLES: (Downtime.BRIEF, True, Scope.VOLUME, ReplicationFate.DROPPED, False),
    O.EXPORT_IMPORT: (Downtime.OFF, True, Scope.VM, ReplicationFate.DROPPED, False),
}


@pytest.mark.parametrize(
    ("deployment", "option"), [(d, o) for d in FIT_CELLS for o in FIT_CELLS[d]]
)
def test_every_fit_cell(deployment: Deployment, option: Option) -> None:
    assert FITS[deployment][option].text() == FIT_CELLS[deployment][option]


def test_the_fit_table_has_no_other_cells() -> None:
    assert {d: set(row) for d, row in FITS.items()} == {d: set(r) for d, r in FIT_CELLS.items()}


@pytest.mark.parametrize("option", list(OPTION_CELLS))
def test_every_option_cell(option: Option) -> None:
    traits = OPTIONS[option]
    assert ("; ".join(traits.gives), "; ".join(traits.costs)) == OPTION_CELLS[option]
    facts = (traits.downtime, traits.new_hardware, traits.scope, traits.replication,
             traits.unprotected_during_move)  # fmt: skip
    assert facts == OPTION_FACTS[option]
    assert set(OPTIONS) == set(OPTION_CELLS)


def test_copy_cluster_roles_can_be_tested_and_reversed() -> None:
    ccr = OPTIONS[O.COPY_CLUSTER_ROLES]
    assert ccr.testable and ccr.reversible
    assert not any(OPTIONS[o].testable for o in OPTIONS if o is not O.COPY_CLUSTER_ROLES)


def test_replica_site_moves_first() -> None:
    assert SITE_ORDER["replica"] < SITE_ORDER["primary"]
    assert SITE_ORDER["extended"] < SITE_ORDER["replica"]
    assert SITE_ORDER["primary"] == UNREPLICATED_RANK


# Ferry's improvements: each changes exactly the cells it names, for the destination
# kinds it names, and is marked.
IMPROVED = {
    (D.STANDALONE, O.IN_PLACE): ("in-place upgrade with VMs running", "yes", Downtime.NONE, ANY),
    (D.CLUSTER_SHARED_VOLUMES, O.IN_PLACE):
        ("rolling cluster upgrade", "yes, node by node: drain, upgrade, resume, then raise "
         "the cluster's level", Downtime.NONE, ANY),
    (D.CLUSTER_FILE_SERVER, O.IN_PLACE):
        ("rolling cluster upgrade", "yes, node by node: drain, upgrade, resume, then raise "
         "the cluster's level", Downtime.NONE, ANY),
    (D.CLUSTER_SHARED_VOLUMES, O.COPY_CLUSTER_ROLES):
        ("replication kept across Copy Cluster Roles", "yes", Downtime.BRIEF, ANY),
    (D.CLUSTER_FILE_SERVER, O.COPY_CLUSTER_ROLES):
        ("replication kept across Copy Cluster Roles", "yes", Downtime.BRIEF, ANY),
    # Only into a cluster; the disks are still copied when the cluster does not see them.
    (D.CLUSTER_SHARED_VOLUMES, O.LIVE_MIGRATION):
        ("live migration without leaving the cluster", "yes, copying its disks during the "
         "move", Downtime.NONE, frozenset({K.CLUSTER})),
    (D.CLUSTER_FILE_SERVER, O.LIVE_MIGRATION):
        ("live migration without leaving the cluster", "yes", Downtime.NONE,
         frozenset({K.CLUSTER})),
}  # fmt: skip


@pytest.mark.parametrize(
    ("deployment", "option", "kind"),
    [(d, o, k) for d in FIT_CELLS for o in FIT_CELLS[d] for k in K],
)
def test_improvements_change_only_their_cells(
    deployment: Deployment, option: Option, kind: DestinationKind
) -> None:
    fit, traits, better = effective(deployment, option, kind)
    if (deployment, option) not in IMPROVED or kind not in IMPROVED[deployment, option][3]:
        assert better is None
        assert fit == FITS[deployment][option] and traits == OPTIONS[option]
        assert "ferry improvement" not in reason(deployment, option, kind)
        return
    title, cell, downtime, _ = IMPROVED[deployment, option]
    assert better is not None and better.title == title
    assert fit.text() == cell and traits.downtime is downtime
    assert f"ferry improvement: {title}" in reason(deployment, option, kind)
    # The reference's own cell stays as it was.
    assert FITS[deployment][option].text() == FIT_CELLS[deployment][option]


def test_improvement_effects() -> None:
    _, ccr, _ = effective(D.CLUSTER_SHARED_VOLUMES, O.COPY_CLUSTER_ROLES, K.CLUSTER)
    assert ccr.replication is ReplicationFate.KEPT
    _, live, _ = effective(D.CLUSTER_FILE_SERVER, O.LIVE_MIGRATION, K.CLUSTER)
    assert live.unprotected_during_move is False
    # A clustered VM going to a standalone host leaves its cluster, as the reference says.
    _, leaving, _ = effective(D.CLUSTER_FILE_SERVER, O.LIVE_MIGRATION, K.HOST)
    assert leaving.unprotected_during_move is True
    assert {i.title for i in IMPROVEMENTS} == {v[0] for v in IMPROVED.values()}
    assert improvement_for(D.STANDALONE, O.LIVE_MIGRATION, K.HOST) is None
    assert improvement_for(D.CLUSTER_SHARED_VOLUMES, O.LIVE_MIGRATION, K.HOST) is None


def test_the_cluster_move_improvement_promises_no_command_that_does_not_exist() -> None:
    words = reason(D.CLUSTER_FILE_SERVER, O.LIVE_MIGRATION, K.CLUSTER)
    assert "planned, not built yet: ferry vm move --to-cluster (issue 13)" in words
    assert "ferry cluster vm remove, then ferry vm move" in words


def test_reason_speaks_the_reference() -> None:
    text = reason(D.CLUSTER_SHARED_VOLUMES, O.EXPORT_IMPORT, K.HOST)
    assert text.startswith("cluster with shared volumes (CSV): export/import yes")
    assert "VM is off during export/import" in text


def test_the_in_place_reason_names_what_plan_apply_runs() -> None:
    # plan apply runs an in-place step as vm refresh, then vm upgrade-version.
    words = reason(Deployment.STANDALONE, Option.IN_PLACE, DestinationKind.SAME_HOST)
    assert "ferry improvement: in-place upgrade with VMs running (ferry vm refresh:" in words
    assert "then ferry vm upgrade-version where its state allows" in words
