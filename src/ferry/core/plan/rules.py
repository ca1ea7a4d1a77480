"""The reference's migration advice as data, with ferry's improvements on top.

Pure: no I/O. Theory of operation: DESIGN.md section 1 gives three tables of
advice, and each is one table here, cell for cell:

- :data:`OPTIONS` is "Migration options": what each option gives and costs,
  as the reference's phrases plus the facts the planner reads from them
  (downtime, new hardware, scope, what happens to replication).
- :data:`FITS` is "Which option fits which deployment": per deployment and
  option a :class:`Fit` (no, yes, or yes with conditions such as leaving the
  cluster or copying the disks).
- :data:`SITE_ORDER` is "With replication in use, move the replica site
  first, then the primary".

:data:`IMPROVEMENTS` are ferry's own, each marked as such: a row that
overrides one cell or one trait of the reference's. :func:`effective` gives
the fit and traits ferry plans with. The choice among the allowed options is
data too (:data:`PREFERENCE`, :data:`DESTINATIONS`), read by
:mod:`ferry.core.plan.planner`; nothing here is an if-chain over options.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from ferry.core.plan.plan_file import Option


class Deployment(StrEnum):
    """The reference's deployments, the rows of the fit table."""

    STANDALONE = "standalone host"
    CLUSTER_SHARED_VOLUMES = "cluster with shared volumes (CSV)"
    CLUSTER_FILE_SERVER = "cluster whose storage is a separate file server"


class Need(StrEnum):
    """A condition a "yes" of the fit table comes with."""

    LEAVE_CLUSTER = "after removing the VM from its cluster"
    COPY_DISKS = "copying its disks during the move"
    NODE_BY_NODE = "node by node: drain, upgrade, resume, then raise the cluster's level"


class Downtime(StrEnum):
    NONE = "none"  # the VM keeps running
    BRIEF = "brief"  # stopped and started again
    OFF = "off"  # off for the whole operation


class Scope(StrEnum):
    HOST = "host"  # everything on a host at once
    VM = "vm"  # one VM at a time
    VOLUME = "volume"  # all VMs on one shared volume together
    CLUSTER = "cluster"


class ReplicationFate(StrEnum):
    KEPT = "kept"
    # Settings dropped: re-enable, using the VM already on the replica as the initial copy.
    DROPPED = "dropped"


class DestinationKind(StrEnum):
    SAME_HOST = "same host"
    HOST = "another host"
    CLUSTER = "a cluster"


@dataclass(frozen=True)
class Fit:
    """One cell of the fit table."""

    allowed: bool
    needs: tuple[Need, ...] = ()

    def text(self) -> str:
        """The cell as the reference writes it."""
        if not self.allowed:
            return "no"
        return ", ".join(("yes", *self.needs))


@dataclass(frozen=True)
class Traits:
    """One row of the options table: the reference's phrases and the facts in them."""

    gives: tuple[str, ...]
    costs: tuple[str, ...]
    downtime: Downtime
    new_hardware: bool
    scope: Scope
    replication: ReplicationFate
    unprotected_during_move: bool = False  # out of its cluster while it moves
    testable: bool = False
    reversible: bool = False


OPTIONS: dict[Option, Traits] = {
    Option.IN_PLACE: Traits(
        gives=("no new hardware",),
        costs=("VMs off during the upgrade",),
        downtime=Downtime.OFF, new_hardware=False, scope=Scope.HOST,
        replication=ReplicationFate.KEPT,
    ),
    Option.LIVE_MIGRATION: Traits(
        gives=("VMs keep running",
               "with disks on a share both hosts see, only config and memory move",
               "cluster-to-cluster moves with no downtime", "single VMs of a cluster"),
        costs=("needs a second host or spare capacity",
               "time grows with memory size and network",
               "without shared storage the disks must be copied too (shared-nothing)",
               "the VM leaves its source cluster first and gets high availability again "
               "only after it lands, so it is unprotected during the move"),
        downtime=Downtime.NONE, new_hardware=True, scope=Scope.VM,
        replication=ReplicationFate.KEPT, unprotected_during_move=True,
    ),
    Option.COPY_CLUSTER_ROLES: Traits(
        gives=("moves a whole cluster's roles to a new cluster",
               "can be tested without touching production", "can be reversed",
               "copies test-cluster roles to production"),
        costs=("all VMs on one shared volume move together", "VMs are down briefly",
               "replication settings are not copied (they must be re-enabled, using the VM "
               "already on the replica as the initial copy)", "needs new hardware"),
        downtime=Downtime.BRIEF, new_hardware=True, scope=Scope.VOLUME,
        replication=ReplicationFate.DROPPED, testable=True, reversible=True,
    ),
    Option.EXPORT_IMPORT: Traits(
        gives=("one VM at a time", "the admin controls how the files travel"),
        costs=("VM is off during export/import", "needs new hardware",
               "import drops the VM's replication settings (re-enable using the existing "
               "replica VM as initial copy)"),
        downtime=Downtime.OFF, new_hardware=True, scope=Scope.VM,
        replication=ReplicationFate.DROPPED,
    ),
}  # fmt: skip

_YES = Fit(True)
_NO = Fit(False)

FITS: dict[Deployment, dict[Option, Fit]] = {
    Deployment.STANDALONE: {
        Option.IN_PLACE: _YES,
        Option.EXPORT_IMPORT: _YES,
        Option.LIVE_MIGRATION: _YES,
        Option.COPY_CLUSTER_ROLES: _NO,
    },
    Deployment.CLUSTER_SHARED_VOLUMES: {
        Option.IN_PLACE: _NO,
        Option.EXPORT_IMPORT: _YES,
        Option.LIVE_MIGRATION: Fit(True, (Need.LEAVE_CLUSTER, Need.COPY_DISKS)),
        Option.COPY_CLUSTER_ROLES: _YES,
    },
    Deployment.CLUSTER_FILE_SERVER: {
        Option.IN_PLACE: _NO,
        Option.EXPORT_IMPORT: _YES,
        Option.LIVE_MIGRATION: Fit(True, (Need.LEAVE_CLUSTER,)),
        Option.COPY_CLUSTER_ROLES: _YES,
    },
}

# Replication role -> rank: lower ranks move first. The reference: the replica
# site before the primary (an older replica refuses a newer primary).
# "extended" (the replica's own replica) is ferry's reading of the same
# version rule one hop further: it is the replica of the replica site.
SITE_ORDER: dict[str, int] = {"extended": 0, "replica": 1, "primary": 2}
UNREPLICATED_RANK = 2  # a VM without replication goes with the primary site


@dataclass(frozen=True)
class Improvement:
    """One of ferry's improvements over the reference: it overrides cells of its tables."""

    title: str
    option: Option
    deployments: frozenset[Deployment]
    command: str  # how ferry does it
    # The destinations it applies to (a VM going elsewhere gets the reference's cell).
    destinations: frozenset[DestinationKind] = frozenset(DestinationKind)
    fit: Fit | None = None  # the cell ferry has instead of the reference's
    lifts: tuple[Need, ...] = ()  # conditions of the reference's cell ferry does without
    downtime: Downtime | None = None
    replication: ReplicationFate | None = None
    unprotected_during_move: bool | None = None


_CLUSTERS = frozenset({Deployment.CLUSTER_SHARED_VOLUMES, Deployment.CLUSTER_FILE_SERVER})

IMPROVEMENTS: tuple[Improvement, ...] = (
    Improvement(
        "in-place upgrade with VMs running", Option.IN_PLACE,
        frozenset({Deployment.STANDALONE}),
        "ferry vm refresh: a running VM moves into a new QEMU on the same host, then ferry "
        "vm upgrade-version where its state allows; an off VM gets upgrade-version alone",
        downtime=Downtime.NONE,
    ),
    Improvement(
        "rolling cluster upgrade", Option.IN_PLACE, _CLUSTERS,
        "ferry cluster drain/resume per node, then cluster upgrade-level",
        fit=Fit(True, (Need.NODE_BY_NODE,)), downtime=Downtime.NONE,
    ),
    Improvement(
        "replication kept across Copy Cluster Roles", Option.COPY_CLUSTER_ROLES, _CLUSTERS,
        "ferry cluster copy-roles carries each VM's replication relationship",
        replication=ReplicationFate.KEPT,
    ),
    Improvement(
        "live migration without leaving the cluster", Option.LIVE_MIGRATION, _CLUSTERS,
        "planned, not built yet: ferry vm move --to-cluster (issue 13) will hand ownership "
        "over at the switch-over; until then take the VM out with ferry cluster vm remove, "
        "then ferry vm move it",
        destinations=frozenset({DestinationKind.CLUSTER}),
        lifts=(Need.LEAVE_CLUSTER,), unprotected_during_move=False,
    ),
)  # fmt: skip


def improvement_for(deployment: Deployment, option: Option,
                    kind: DestinationKind) -> Improvement | None:  # fmt: skip
    return next((i for i in IMPROVEMENTS if i.option is option and deployment in i.deployments
                 and kind in i.destinations), None)  # fmt: skip


def effective(
    deployment: Deployment, option: Option, kind: DestinationKind
) -> tuple[Fit, Traits, Improvement | None]:
    """The fit and traits ferry plans with for a VM going to a ``kind`` destination: the
    reference's, with its improvement applied."""
    fit, traits = FITS[deployment][option], OPTIONS[option]
    better = improvement_for(deployment, option, kind)
    if better is None:
        return fit, traits, None
    fit = better.fit or fit
    fit = replace(fit, needs=tuple(n for n in fit.needs if n not in better.lifts))
    traits = replace(
        traits,
        downtime=better.downtime or traits.downtime,
        replication=better.replication or traits.replication,
        unprotected_during_move=traits.unprotected_during_move
        if better.unprotected_during_move is None
        else better.unprotected_during_move,
    )
    return fit, traits, better


# Which destinations an option can reach.
DESTINATIONS: dict[Option, frozenset[DestinationKind]] = {
    Option.IN_PLACE: frozenset({DestinationKind.SAME_HOST}),
    Option.LIVE_MIGRATION: frozenset({DestinationKind.HOST, DestinationKind.CLUSTER}),
    Option.EXPORT_IMPORT: frozenset({DestinationKind.HOST, DestinationKind.CLUSTER}),
    Option.COPY_CLUSTER_ROLES: frozenset({DestinationKind.CLUSTER}),
}

# The planner's order of preference, by whether the VM runs: the least
# downtime first (live migration runs only running VMs; an off VM loses
# nothing by export/import). The first option that fits, reaches the
# destination and meets the policy is chosen.
PREFERENCE: dict[bool, tuple[Option, ...]] = {
    True: (Option.IN_PLACE, Option.LIVE_MIGRATION, Option.COPY_CLUSTER_ROLES,
           Option.EXPORT_IMPORT),
    False: (Option.IN_PLACE, Option.EXPORT_IMPORT, Option.COPY_CLUSTER_ROLES),
}  # fmt: skip

# Downtime kinds a policy's ``must-run`` accepts.
MUST_RUN_ACCEPTS = frozenset({Downtime.NONE})


# The options as the reference names them.
TITLES: dict[Option, str] = {
    Option.IN_PLACE: "in-place upgrade",
    Option.EXPORT_IMPORT: "export/import",
    Option.LIVE_MIGRATION: "live migration",
    Option.COPY_CLUSTER_ROLES: "Copy Cluster Roles",
}


def reason(deployment: Deployment, option: Option, kind: DestinationKind) -> str:
    """Why ``option`` fits a VM of ``deployment`` going to ``kind``, in the reference's terms."""
    fit, traits, better = effective(deployment, option, kind)
    words = f"{deployment}: {TITLES[option]} {fit.text()}"
    words += f" ({traits.gives[0]}; {traits.costs[0]})"
    if better is not None:
        # How ferry does it: the reference's cost above may be what it takes away.
        words += f"; ferry improvement: {better.title} ({better.command})"
    return words
