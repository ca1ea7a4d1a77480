"""Placement and the drain plan: pure functions of the nodes' state."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from ferry.core.cluster.drain import DrainVm, plan_drain
from ferry.core.cluster.nodes import NodeState as State
from ferry.core.cluster.placement import VmDemand, place, place_all
from ferry.core.cluster.roles import Priority
from ferry.errors import ConflictError, NoPlacementError

M = 1024**2


@dataclass(frozen=True)
class Node:
    name: str
    state: State = State.UP
    functional_level: int = 3
    memory_free: int = 1024 * M


VM = VmDemand("web", 256 * M, 2)


def test_most_free_memory_wins_ties_by_name() -> None:
    nodes = [Node("a", memory_free=500 * M), Node("b", memory_free=900 * M),
             Node("c", memory_free=900 * M)]  # fmt: skip
    assert place(VM, nodes) == "b"


def test_only_up_nodes_of_a_high_enough_level_with_room() -> None:
    nodes = [
        Node("down", State.DOWN, memory_free=9000 * M),
        Node("drain", State.DRAINING, memory_free=9000 * M),
        Node("fenced", State.FENCED, memory_free=9000 * M),
        Node("old", functional_level=1, memory_free=9000 * M),
        Node("small", memory_free=100 * M),
        Node("ok", memory_free=300 * M),
    ]
    assert place(VM, nodes) == "ok"


def test_refusal_gives_a_reason_per_node() -> None:
    nodes = [Node("a", State.DRAINING), Node("b", functional_level=1),
             Node("c", memory_free=100 * M), Node("d")]  # fmt: skip
    with pytest.raises(NoPlacementError) as caught:
        place(VM, nodes, exclude={"d"})
    exc = caught.value
    assert isinstance(exc, ConflictError)
    assert exc.reasons == {"a": "is draining", "b": "runs functional level 1",
                           "c": "has 100M free", "d": "is where the VM is now"}  # fmt: skip
    assert str(exc) == (
        "cannot place VM 'web' (256M, configuration version 2): a is draining; "
        "b runs functional level 1; c has 100M free; d is where the VM is now"
    )
    assert "\n" not in str(exc)


def test_asking_for_a_host_checks_that_host_only() -> None:
    nodes = [Node("a", memory_free=100 * M), Node("b", memory_free=2000 * M)]
    assert place(VM, nodes, host="b") == "b"
    with pytest.raises(NoPlacementError, match=r"a has 100M free$"):
        place(VM, nodes, host="a")
    with pytest.raises(NoPlacementError, match="x is not a node of the cluster"):
        place(VM, nodes, host="x")


def test_no_nodes() -> None:
    with pytest.raises(NoPlacementError, match="the cluster has no nodes"):
        place(VM, [])


def test_place_all_counts_memory_already_placed() -> None:
    nodes = [Node("a", memory_free=600 * M), Node("b", memory_free=500 * M)]
    vms = [VmDemand(f"vm{i}", 256 * M, 1) for i in range(4)]
    placed = place_all(vms, nodes)
    assert [where for _, where in placed[:3]] == ["a", "b", "a"]
    assert isinstance(placed[3][1], NoPlacementError)


def _drain_vm(name: str, priority: Priority, memory: int = 256 * M,
              running: bool = True, version: int = 2) -> DrainVm:  # fmt: skip
    return DrainVm(f"uuid-{name}", name, memory, version, priority, running)


def test_drain_plan_high_priority_first_away_from_the_node() -> None:
    nodes = [Node("n1", memory_free=4000 * M), Node("n2", memory_free=600 * M),
             Node("n3", memory_free=500 * M)]  # fmt: skip
    vms = [_drain_vm("z", Priority.HIGH), _drain_vm("a", Priority.LOW, running=False),
           _drain_vm("m", Priority.HIGH)]  # fmt: skip
    plan = plan_drain("n1", vms, nodes)
    assert plan.blocked is None
    assert [(s.vm.name, s.target, s.live) for s in plan.steps] == [
        ("m", "n2", True), ("z", "n3", True), ("a", "n2", False)]  # fmt: skip


def test_drain_plan_stops_at_the_first_vm_it_cannot_place() -> None:
    nodes = [Node("n1"), Node("n2", memory_free=300 * M), Node("n3", functional_level=2)]
    vms = [_drain_vm("big", Priority.LOW, memory=512 * M, version=3),
           _drain_vm("first", Priority.HIGH)]  # fmt: skip
    plan = plan_drain("n1", vms, nodes)
    assert [s.vm.name for s in plan.steps] == ["first"]
    assert plan.blocked is not None
    assert str(plan.blocked) == (
        "cannot place VM 'big' (512M, configuration version 3): n1 is where the VM is now; "
        "n2 has 300M free; n3 runs functional level 2"
    )
