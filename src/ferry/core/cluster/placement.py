"""Where a clustered VM may run: placement, a pure function of the nodes' state.

:func:`place` picks, among the nodes that are ``up`` (not down, fenced or
draining), run a functional level at least the VM's configuration version and
have the VM's memory free, the one with the most free memory (ties: the
first name, so the answer is stable). When no node qualifies it raises
:class:`~ferry.errors.NoPlacementError` (a ``ConflictError``) with
``reasons``, one per node, so a refusal says for
each node why not.

How to call it (HA, drain, create, move)::

    from ferry.core.cluster.placement import VmDemand, place

    nodes = await membership.nodes()          # NodeView: name, state,
                                              # functional_level, memory_free
    target = place(VmDemand(name="web", memory=spec.memory,
                            config_version=spec.config_version),
                   nodes, exclude={current_owner})

``nodes`` may be any objects with ``name``, ``state`` (``"up"``,
``"down"``, ``"draining"``, ``"fenced"``; a ``StrEnum`` works),
``functional_level`` and ``memory_free`` (bytes). ``exclude`` are nodes the
VM must not go to (its current owner, for a move or an HA restart away from
a lost node); ``host`` asks for one node and checks it the same way.
:func:`place_all` places several VMs in turn, counting each placed VM's
memory against its node (a drain, or HA restarting a lost node's VMs).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ferry.core.units import format_size
from ferry.errors import NoPlacementError

UP = "up"


class PlacementNode(Protocol):
    """What placement reads of a node (``ferry.core.cluster.nodes.NodeView`` has it)."""

    @property
    def name(self) -> str: ...

    @property
    def state(self) -> str: ...

    @property
    def functional_level(self) -> int: ...

    @property
    def memory_free(self) -> int: ...


@dataclass(frozen=True)
class VmDemand:
    """What a VM needs of a node."""

    name: str
    memory: int
    config_version: int


def _refused(vm: VmDemand, reasons: Mapping[str, str]) -> NoPlacementError:
    why = "; ".join(f"{node} {reason}" for node, reason in sorted(reasons.items()))
    return NoPlacementError(
        f"cannot place VM {vm.name!r} ({format_size(vm.memory)}, configuration version "
        f"{vm.config_version}): {why or 'the cluster has no nodes'}",
        vm=vm.name,
        reasons=dict(reasons),
    )


def refusal(vm: VmDemand, node: PlacementNode, *, excluded: bool = False) -> str | None:
    """Why ``node`` cannot take ``vm`` (None: it can)."""
    if excluded:
        return "is where the VM is now"
    state = str(node.state)
    if state != UP:
        return f"is {state}"
    if node.functional_level < vm.config_version:
        return f"runs functional level {node.functional_level}"
    if node.memory_free < vm.memory:
        return f"has {format_size(max(0, node.memory_free))} free"
    return None


def place(
    vm: VmDemand,
    nodes: Iterable[PlacementNode],
    *,
    exclude: Collection[str] = (),
    host: str | None = None,
) -> str:
    """The node ``vm`` should run on (see the module docstring)."""
    nodes = list(nodes)
    if host is not None:
        chosen = [node for node in nodes if node.name == host]
        if not chosen:
            known = ", ".join(sorted(node.name for node in nodes)) or "none"
            raise _refused(vm, {host: f"is not a node of the cluster (nodes: {known})"})
        nodes = chosen
    reasons: dict[str, str] = {}
    fit: list[PlacementNode] = []
    for node in nodes:
        why = refusal(vm, node, excluded=node.name in exclude)
        if why is None:
            fit.append(node)
        else:
            reasons[node.name] = why
    if not fit:
        raise _refused(vm, reasons)
    return min(fit, key=lambda node: (-node.memory_free, node.name)).name


@dataclass(frozen=True)
class _Free:
    """A node with what is left free once earlier VMs of a batch were placed on it."""

    name: str
    state: str
    functional_level: int
    memory_free: int


def place_all(
    vms: Sequence[VmDemand],
    nodes: Iterable[PlacementNode],
    *,
    exclude: Collection[str] = (),
) -> list[tuple[VmDemand, str | NoPlacementError]]:
    """Place ``vms`` in order; each placed VM's memory counts against its node.

    Every VM gets its node or the refusal; a refused VM takes nothing.
    """
    free = {
        node.name: _Free(node.name, str(node.state), node.functional_level, node.memory_free)
        for node in nodes
    }
    placed: list[tuple[VmDemand, str | NoPlacementError]] = []
    for vm in vms:
        try:
            target = place(vm, free.values(), exclude=exclude)
        except NoPlacementError as exc:
            placed.append((vm, exc))
            continue
        node = free[target]
        free[target] = _Free(node.name, node.state, node.functional_level,
                             node.memory_free - vm.memory)  # fmt: skip
        placed.append((vm, target))
    return placed
