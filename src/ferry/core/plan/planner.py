"""Make a plan: for each VM on the sources, the option, its reason, estimates, order, warnings.

Pure: an :class:`~ferry.core.plan.plan_file.Inventory` and a
:class:`~ferry.core.plan.policy.Policy` in, a :class:`~ferry.core.plan.plan_file.Plan`
out. For each VM the deployment it is in (standalone, a cluster whose volume
the destination does not see, a cluster whose storage it does see) and the
kind of destination pick the rows of the rule table
(:mod:`ferry.core.plan.rules`); the first option in the table's order of
preference that fits, reaches the destination and meets the VM's policy is
chosen, with its estimate (:mod:`ferry.core.plan.estimate`). Then the steps
are ordered and placed (:mod:`ferry.core.plan.order`) and checked against
the maintenance windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ferry.core.cpu_models import effective_model
from ferry.core.plan import estimate as est
from ferry.core.plan.calibrate import calibrate
from ferry.core.plan.order import Pending, group_of, place, site_rank, sort
from ferry.core.plan.plan_file import (
    HostFacts,
    Inventory,
    Option,
    Plan,
    Preconditions,
    Step,
    StorageKind,
    VmFacts,
)
from ferry.core.plan.policy import NO_POLICY, Needs, Policy
from ferry.core.plan.rules import (
    DESTINATIONS,
    MUST_RUN_ACCEPTS,
    OPTIONS,
    PREFERENCE,
    Deployment,
    DestinationKind,
    ReplicationFate,
    Scope,
    effective,
    reason,
)
from ferry.errors import InvalidInputError

MiB = 1024**2


@dataclass(frozen=True)
class Targets:
    """What ``--from`` and ``--to`` named, resolved to hosts."""

    sources: Sequence[str]  # hosts
    destinations: Sequence[str]  # hosts
    destination_clusters: Sequence[str] = ()  # the clusters among the destinations
    named_sources: Sequence[str] = ()
    named_destinations: Sequence[str] = ()


@dataclass
class _Choice:
    option: Option
    reason: str
    estimate: est.Estimate
    improvement: str | None
    warnings: list[str]


def _sees(host: HostFacts, vm: VmFacts, inv: Inventory) -> bool:
    """Whether ``host`` sees every disk of ``vm`` at the same path (shared storage)."""
    if not vm.disks or vm.storage not in (StorageKind.HOST_VOLUME, StorageKind.CLUSTER_VOLUME):
        return False
    source = inv.host(vm.host)
    here = source.volumes if source else {}
    roots = {here[d.volume] for d in vm.disks if d.volume in here}
    return bool(roots) and roots <= set(host.volumes.values())


def deployment(vm: VmFacts, destination: HostFacts, inv: Inventory) -> Deployment:
    if vm.cluster is None:
        return Deployment.STANDALONE
    if _sees(destination, vm, inv):
        return Deployment.CLUSTER_FILE_SERVER
    return Deployment.CLUSTER_SHARED_VOLUMES


def destination_kind(vm: VmFacts, destination: HostFacts, targets: Targets) -> DestinationKind:
    if destination.name == vm.host:
        return DestinationKind.SAME_HOST
    if destination.cluster is not None and destination.cluster in targets.destination_clusters:
        return DestinationKind.CLUSTER
    return DestinationKind.HOST


def suits(vm: VmFacts, host: HostFacts) -> str | None:
    """Why ``host`` cannot take ``vm`` as it is (one line), or None."""
    if host.networks is not None:
        missing = sorted(set(vm.networks) - set(host.networks))
        if missing:
            return (f"destination {host.name} lacks network {missing[0]!r} of VM {vm.name!r} "
                    "(add it there with 'ferry host network add', or re-plan)")  # fmt: skip
    if host.cpu_models:
        model = effective_model(vm.cpu_model)
        if model not in host.cpu_models:
            return f"destination {host.name} cannot run CPU model {model!r} of VM {vm.name!r}"
    low, high = host.supported_config_versions
    if not low <= vm.config_version <= high:
        return (f"destination {host.name} runs configuration versions {low}-{high}, not "
                f"{vm.config_version} of VM {vm.name!r}")  # fmt: skip
    if vm.replication is not None and host.name in vm.replication.partners:
        return f"destination {host.name} holds a copy of VM {vm.name!r} already (replication)"
    return None


def calibration(inv: Inventory, host: str) -> est.Calibration:
    """The estimate's constants for moves from ``host``: fitted from its recent moves."""
    facts = inv.host(host)
    return calibrate(facts.recent_moves) if facts else est.DEFAULT


def _workload(vm: VmFacts, src: str, dst: HostFacts, inv: Inventory, needs: Needs) -> est.Workload:
    link = inv.link(src, dst.name)
    return est.Workload(
        memory=vm.memory, dirty_rate_bps=vm.dirty_rate_bps or 0.0, disk_bytes=vm.disk_bytes,
        copy_disks=not _sees(dst, vm, inv),
        bandwidth_bps=link.bandwidth_bps if link else est.DEFAULT.migration_cap_bps,
        running=vm.state == "running", downtime_limit_s=needs.max_downtime_s,
        memory_used=vm.memory_used,
    )  # fmt: skip


def _meets(choice: _Choice, needs: Needs, downtime_kind: object) -> str | None:
    if needs.must_run and downtime_kind not in MUST_RUN_ACCEPTS:
        return "the policy says must-run"
    if needs.max_downtime_s is not None and choice.estimate.downtime_s > needs.max_downtime_s:
        return (f"its downtime ({choice.estimate.downtime_s:.2f} s) is over the policy's "
                f"max-downtime ({needs.max_downtime_s:g} s)")  # fmt: skip
    if not choice.estimate.converges:
        return "it would not converge"
    return None


def choose(vm: VmFacts, dst: HostFacts, inv: Inventory, targets: Targets, needs: Needs) -> _Choice:
    """The option for ``vm`` going to ``dst``: the first that fits and meets its needs."""
    dep = deployment(vm, dst, inv)
    kind = destination_kind(vm, dst, targets)
    work = _workload(vm, vm.host, dst, inv, needs)
    running = vm.state == "running"
    candidates: list[tuple[_Choice, str | None]] = []
    for option in PREFERENCE[running]:
        fit, traits, better = effective(dep, option, kind)
        if not fit.allowed or kind not in DESTINATIONS[option]:
            continue
        figure = est.estimate(option, work, calibration(inv, vm.host))
        choice = _Choice(option, reason(dep, option, kind), figure,
                         better.title if better else None, [])  # fmt: skip
        if traits.replication is ReplicationFate.DROPPED and vm.replication is not None:
            choice.warnings.append(
                f"VM {vm.name!r}: {option.value} drops its replication settings; re-enable "
                "them with 'ferry replication enable --initial existing' afterwards")  # fmt: skip
        if traits.scope is Scope.VOLUME and vm.volume is None:
            continue
        candidates.append((choice, _meets(choice, needs, traits.downtime)))
        if candidates[-1][1] is None:
            for passed, why in candidates[:-1]:
                detail = _convergence_warning(vm, passed, work) or f"VM {vm.name!r}: {why}"
                choice.warnings.append(f"{detail} (so not {passed.option.value})")
            return choice
    if not candidates:
        raise InvalidInputError(f"no migration option takes VM {vm.name!r} from {vm.host} "
                                f"to {dst.name} ({dep}, {kind})")  # fmt: skip
    first, why = candidates[0]
    first.warnings.append(f"VM {vm.name!r}: no option meets its needs; {first.option.value} "
                          f"is planned, but {why}")  # fmt: skip
    return first


def _convergence_warning(vm: VmFacts, choice: _Choice, work: est.Workload) -> str | None:
    if choice.option is not Option.LIVE_MIGRATION or choice.estimate.converges:
        return None
    return (f"VM {vm.name!r} will not converge: it dirties "
            f"{work.dirty_rate_bps / MiB:.0f} MiB/s and the link carries "
            f"{work.bandwidth_bps / MiB:.0f} MiB/s (a move's stream about "
            f"{est.stream_bps(work) / MiB:.0f}); lower its load, raise the bandwidth, "
            "or plan it as export/import")  # fmt: skip


def _fmt_s(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02}m" if hours else f"{minutes}m{secs:02}s"


def make_plan(
    inv: Inventory, targets: Targets, policy: Policy = NO_POLICY, *, created: str
) -> Plan:
    hosts = {h.name: h for h in inv.hosts}
    for name in (*targets.sources, *targets.destinations):
        if name not in hosts:
            raise InvalidInputError(f"host {name!r} is not in the inventory")
    pending: list[Pending] = []
    for vm in inv.vms:
        if vm.host not in targets.sources:
            continue
        if vm.is_replica:
            dests = [d for d in targets.destinations if d != vm.host]
        else:
            same = [d for d in targets.destinations if d == vm.host]
            dests = same if same and len(targets.destinations) == 1 else \
                [d for d in targets.destinations if d != vm.host]  # fmt: skip
        if not dests:
            continue
        pending.append(Pending(vm=vm, destinations=dests,
                               needs_memory=vm.state == "running" and not vm.is_replica,
                               group=group_of(vm), rank=site_rank(vm)))  # fmt: skip
    placed = place(sort(pending), hosts, suits)
    steps: list[Step] = []
    warnings: list[str] = []
    elapsed = 0.0
    by_uuid: dict[str, list[int]] = {}
    choices = [_first_choice(p, hosts, inv, targets, policy) for p in placed]
    # A volume that moves whole (Copy Cluster Roles) takes every VM on it along.
    whole = {p.group: c.option for p, c in zip(placed, choices, strict=True)
             if p.group is not None and c.option in OPTIONS
             and OPTIONS[c.option].scope is Scope.VOLUME}  # fmt: skip
    for index, (p, choice) in enumerate(zip(placed, choices, strict=True), 1):
        vm, dst = p.vm, hosts[p.chosen or p.destinations[0]]
        needs = policy.needs(vm)
        work = _workload(vm, vm.host, dst, inv, needs)
        if p.group in whole and not vm.is_replica:
            choice = _follow_volume(vm, dst, inv, targets, needs, whole[p.group], choice)
        step_warnings = [*p.warnings, *choice.warnings]
        converge = _convergence_warning(vm, choice, work)
        if converge:
            step_warnings.append(converge)
        if vm.state == "running" and vm.dirty_rate_bps is None and not vm.is_replica:
            step_warnings.append(f"VM {vm.name!r}: dirty rate not measured "
                                 f"({vm.dirty_rate_note}); the estimate assumes none")  # fmt: skip
        elapsed += choice.estimate.total_s
        window = needs.window
        if window is not None and elapsed > window.length_s:
            step_warnings.append(
                f"VM {vm.name!r}: its step ends {_fmt_s(elapsed)} into the plan, past its "
                f"window {window.text} ({_fmt_s(window.length_s)})")  # fmt: skip
        storage = None
        if choice.option is Option.LIVE_MIGRATION:
            storage = "copy" if work.copy_disks else "shared"
        after = [] if vm.is_replica else list(by_uuid.get(vm.uuid, []))
        by_uuid.setdefault(vm.uuid, []).append(index)
        steps.append(Step(
            order=index, vm=vm.name, option=choice.option, reason=choice.reason,
            estimate_s=choice.estimate.total_s, downtime_s=choice.estimate.downtime_s,
            source=vm.host, destination=dst.name,
            destination_cluster=dst.cluster if dst.cluster in targets.destination_clusters
            else None,
            storage=storage, volume=vm.volume, group=p.group, improvement=choice.improvement,
            downtime_limit_ms=None if storage is None or needs.max_downtime_s is None
            else min(max(round(needs.max_downtime_s * 1000), 1), 600_000),
            warnings=step_warnings,
            preconditions=Preconditions(
                vm_uuid=vm.uuid, vm_host=vm.host, replica=vm.is_replica,
                config_version=vm.config_version, state=vm.state,
                must_be_running=choice.option is Option.LIVE_MIGRATION,
                destination_free_memory=vm.memory if p.needs_memory else 0,
                destination_functional_level=dst.functional_level, networks=list(vm.networks),
                cpu_model=vm.cpu_model, after=after),
        ))  # fmt: skip
    if not steps:
        warnings.append("no VM to move: the sources hold none that the destinations can take")
    return Plan(created=created, sources=list(targets.named_sources or targets.sources),
                destinations=list(targets.named_destinations or targets.destinations),
                policy=policy.source, inventory=inv, steps=steps, warnings=warnings)  # fmt: skip


def _first_choice(p: Pending, hosts: dict[str, HostFacts], inv: Inventory, targets: Targets,
                  policy: Policy) -> _Choice:  # fmt: skip
    vm, dst = p.vm, hosts[p.chosen or p.destinations[0]]
    needs = policy.needs(vm)
    if not vm.is_replica:
        return choose(vm, dst, inv, targets, needs)
    work = _workload(vm, vm.host, dst, inv, needs)
    cal = calibration(inv, vm.host)
    return _Choice(Option.MOVE_REPLICA,
                   "replication in use: move the replica site first, then the primary "
                   "(an older replica refuses a newer primary)",
                   est.estimate(Option.MOVE_REPLICA, work, cal), None, [])  # fmt: skip


def _follow_volume(vm: VmFacts, dst: HostFacts, inv: Inventory, targets: Targets, needs: Needs,
                   option: Option, own: _Choice) -> _Choice:  # fmt: skip
    """A VM on a volume that moves as a whole (Copy Cluster Roles) goes with it."""
    if own.option is option:
        return own
    dep = deployment(vm, dst, inv)
    work = _workload(vm, vm.host, dst, inv, needs)
    figure = est.estimate(option, work, calibration(inv, vm.host))
    kind = destination_kind(vm, dst, targets)
    _, _, better = effective(dep, option, kind)
    return _Choice(option, reason(dep, option, kind) + "; moves with its volume",
                   figure, better.title if better else None, [])  # fmt: skip
