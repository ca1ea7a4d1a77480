"""The plan of ``cluster drain NODE``: where each of the node's VMs goes. Pure.

High priority first, then by name; each VM is placed (:mod:`.placement`)
away from the drained node, counting the memory of the VMs placed before it.
A running VM moves live; a VM that is off only changes owner. The first VM
that cannot be placed ends the plan: :attr:`DrainPlan.blocked` holds its
refusal, which names the VM and says why for each node.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ferry.core.cluster.placement import PlacementNode, VmDemand, place_all
from ferry.core.cluster.roles import Priority
from ferry.errors import NoPlacementError


@dataclass(frozen=True)
class DrainVm:
    uuid: str
    name: str
    memory: int
    config_version: int
    priority: Priority
    running: bool


@dataclass(frozen=True)
class DrainStep:
    vm: DrainVm
    target: str

    @property
    def live(self) -> bool:
        return self.vm.running


@dataclass(frozen=True)
class DrainPlan:
    node: str
    steps: tuple[DrainStep, ...]
    blocked: NoPlacementError | None = None


def drain_order(vms: Iterable[DrainVm]) -> list[DrainVm]:
    return sorted(vms, key=lambda vm: (vm.priority.rank, vm.name))


def plan_drain(node: str, vms: Sequence[DrainVm], nodes: Iterable[PlacementNode]) -> DrainPlan:
    ordered = drain_order(vms)
    demands = [VmDemand(vm.name, vm.memory, vm.config_version) for vm in ordered]
    steps: list[DrainStep] = []
    for vm, (_, where) in zip(ordered, place_all(demands, nodes, exclude={node}), strict=True):
        if isinstance(where, NoPlacementError):
            return DrainPlan(node, tuple(steps), blocked=where)
        steps.append(DrainStep(vm, where))
    return DrainPlan(node, tuple(steps))
