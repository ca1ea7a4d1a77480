"""In what order a plan's moves run, and where each lands with capacity respected.

Pure. The order is a sort key read from the rule table: first the site rank
(:data:`ferry.core.plan.rules.SITE_ORDER`: extended replicas, then replicas,
then primaries and unreplicated VMs), then the VM's group (the VMs of one
shared volume go together, one after another), then the name. Then the steps
are walked in that order with each host's free memory: a running VM needs its
memory free on its destination when its step runs, and gives it back to its
source once moved. With several destinations, a step takes the one that
suits the VM (its networks, its CPU model, its configuration version, no
other copy of it there or going there) and has the most memory free then;
when none has room, the plan is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ferry.core.plan.plan_file import HostFacts, VmFacts
from ferry.core.plan.rules import SITE_ORDER, UNREPLICATED_RANK
from ferry.core.units import format_size
from ferry.errors import ConflictError


def site_rank(vm: VmFacts) -> int:
    if vm.replication is None:
        return UNREPLICATED_RANK
    return SITE_ORDER[vm.replication.role]


def group_of(vm: VmFacts) -> str | None:
    """The VMs of one shared volume move together."""
    if vm.volume is None:
        return None
    return f"{vm.cluster or vm.host}/{vm.volume}"


@dataclass
class Pending:
    """One VM's step before it has an order and a destination."""

    vm: VmFacts
    destinations: Sequence[str]  # candidates; the first that suits and has room wins
    needs_memory: bool  # a running VM takes its memory on the destination
    group: str | None = None
    rank: int = 0
    chosen: str | None = None
    warnings: list[str] = field(default_factory=list)


# Why a destination does not suit a VM (one line), or None.
Suitability = Callable[[VmFacts, HostFacts], str | None]


def sort(pending: Sequence[Pending]) -> list[Pending]:
    """Site rank first; a group sorts by its lowest rank and its members stay together."""
    group_rank: dict[str, int] = {}
    for p in pending:
        if p.group is not None:
            group_rank[p.group] = min(group_rank.get(p.group, p.rank), p.rank)

    def key(p: Pending) -> tuple[int, str, str, str]:
        rank = group_rank[p.group] if p.group is not None else p.rank
        return (rank, p.group or p.vm.name, p.vm.name, p.vm.host)

    return sorted(pending, key=key)


def place(
    ordered: Sequence[Pending], hosts: dict[str, HostFacts], suits: Suitability
) -> list[Pending]:
    """Pick each step's destination in order, keeping every host's free memory."""
    free = {name: h.free_memory for name, h in hosts.items()}
    landed: dict[str, str] = {}  # uuid -> where an earlier step put a copy of that VM
    for p in ordered:
        reasons: list[str] = []
        fitting: list[str] = []
        for name in p.destinations:
            why = suits(p.vm, hosts[name]) if name in hosts else f"host {name!r} is unknown"
            if why is None and landed.get(p.vm.uuid) == name:
                why = (f"destination {name} takes the other copy of VM {p.vm.name!r} "
                       "(replication) in an earlier step")  # fmt: skip
            if why is None:
                fitting.append(name)
            else:
                reasons.append(why)
        candidates = fitting or list(p.destinations)
        if not fitting and reasons:
            p.warnings.append(reasons[0])
        if p.needs_memory:
            roomy = [n for n in candidates if free.get(n, 0) >= p.vm.memory]
            if not roomy:
                best = max(candidates, key=lambda n: free.get(n, 0))
                raise ConflictError(
                    f"destination lacks capacity: VM {p.vm.name!r} needs "
                    f"{format_size(p.vm.memory)} of memory and {best} has "
                    f"{format_size(max(free.get(best, 0), 0))} free at that step; "
                    "add a destination host or free memory there"
                )
            candidates = roomy
        p.chosen = max(candidates, key=lambda n: (free.get(n, 0), [-ord(c) for c in n]))
        landed[p.vm.uuid] = p.chosen
        if p.needs_memory and p.chosen != p.vm.host:
            free[p.chosen] -= p.vm.memory
            if p.vm.host in free:
                free[p.vm.host] += p.vm.memory
    return list(ordered)
