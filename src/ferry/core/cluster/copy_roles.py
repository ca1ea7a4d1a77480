"""Copy Cluster Roles: the rules of moving every VM of one volume into another cluster, pure.

``cluster copy-roles --from C1 --to C2 --volume V`` works in three steps, each
decided here before anything changes, each refusal one line with its remedy:

- ``--test`` picks the VMs of C1 on volume V (:func:`pick`: asking for one VM
  picks every VM on its volume, and the report says so), checks them against
  C2 (:func:`check_request`, then :func:`check_vms`: none migrating, the
  *version rule* of :func:`ferry.core.cluster.crossing.check_level` for each)
  and builds the pre-migration report (:func:`report`: configuration versions
  against C2's functional level, CPU models and networks as ``--network-map``
  maps them, on every up node of C2 (:class:`NodeFacts`), capacity through
  :func:`ferry.core.cluster.placement.place_all`, replication). Its
  :class:`CopyRecord` (phase ``tested``) goes into C2's store at
  :func:`record_key`.
- ``--run`` needs that record for the same volume and source
  (:func:`check_step`); it then becomes phase ``ran``, holding what each VM
  was before (node, state), so that
- ``--rollback`` (only after a ``--run``) can give the VMs back as they were
  (after a ``--run`` that copied the disks, :attr:`CopyRecord.copied`, what
  they wrote in the target is copied back first).

The record is the ownership record of the hand-over: while it says ``ran``,
C2 owns V's VMs and C1 refuses to start them (:func:`start_refusal`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any

from ferry.core.cluster.crossing import check_level, check_target
from ferry.core.cluster.keys import ClusterKeys
from ferry.core.cluster.placement import PlacementNode, VmDemand, place_all
from ferry.core.cpu_models import CpuFacts, cpu_refusal
from ferry.errors import ConflictError, InvalidInputError, NotFoundError, StateError


class Step(StrEnum):
    TEST = "test"
    RUN = "run"
    ROLLBACK = "rollback"


class Phase(StrEnum):
    """Where a volume's copy stands, as its :class:`CopyRecord` in C2 says."""

    TESTED = "tested"  # stopped copies registered in C2, C1 unchanged
    RAN = "ran"  # C2 owns the VMs; C1 may not start them
    ROLLED_BACK = "rolled-back"  # given back to C1


@dataclasses.dataclass(frozen=True)
class CopyVm:
    """One VM of C1 as the rules see it."""

    name: str
    uuid: str
    volume: str
    config_version: int
    memory: int
    node: str = ""  # its owner in C1
    state: str = "off"  # as its owner last saw it
    cpu_model: str | None = None
    networks: tuple[str, ...] = ()
    replica: str | None = None  # where it replicates to, if it does
    migrating: bool = False  # a move of it is under way


@dataclasses.dataclass(frozen=True)
class CopyRecord:
    """``copy-roles/<volume>`` in C2's store: one volume's copy from ``source``."""

    source: str
    target: str
    volume: str
    phase: Phase
    at: float
    vms: tuple[CopyVm, ...] = ()
    copied: bool = False  # the volumes were different directories: --run copied the disks

    def to_json(self) -> bytes:
        data = dataclasses.asdict(self)
        data["phase"] = self.phase.value
        return json.dumps(data).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> CopyRecord:
        data = json.loads(raw)
        vms = tuple(CopyVm(**{**vm, "networks": tuple(vm.get("networks", ()))})
                    for vm in data.get("vms", ()))  # fmt: skip
        return cls(str(data["source"]), str(data["target"]), str(data["volume"]),
                   Phase(data["phase"]), float(data["at"]), vms,
                   bool(data.get("copied", False)))  # fmt: skip


def record_key(target: ClusterKeys, volume: str) -> str:
    """Where C2 keeps the copy record of ``volume``."""
    return f"{target.prefix}copy-roles/{volume}"


def check_request(*, source: str, target: str, volume: str, known: Sequence[str],
                  target_volumes: Mapping[str, str]) -> None:  # fmt: skip
    """Both clusters exist and differ, and C2 has the volume."""
    if source == target:
        raise InvalidInputError(f"--from and --to are both {source!r}: copy-roles moves a "
                                "volume's VMs into another cluster")  # fmt: skip
    if source not in known:
        listed = ", ".join(sorted(known)) or "none"
        raise NotFoundError(f"unknown cluster {source!r} (clusters in this etcd: {listed})")
    check_target(volume, source=source, target=target, known=list(known))
    if volume not in target_volumes:
        listed = ", ".join(sorted(target_volumes)) or "none"
        raise NotFoundError(f"cluster {target!r} has no volume {volume!r} (volumes: {listed}): "
                            f"add it with 'ferry cluster volume add {volume} PATH --cluster "
                            f"{target}'")  # fmt: skip


def pick(volume: str, vms: Iterable[CopyVm], *, asked: str | None = None) -> tuple[
        list[CopyVm], str]:  # fmt: skip
    """The VMs of ``volume`` (all of them, also when one was ``asked`` for) and the note
    the report carries about the choice."""
    every = list(vms)
    if asked is not None:
        found = next((vm for vm in every if vm.name == asked), None)
        if found is None:
            raise NotFoundError(f"no VM {asked!r} in the source cluster")
        volume = found.volume
    chosen = sorted((vm for vm in every if vm.volume == volume), key=lambda vm: vm.name)
    if not chosen:
        raise NotFoundError(f"no VM of the source cluster is on volume {volume!r}: nothing "
                            "to copy")  # fmt: skip
    names = ", ".join(vm.name for vm in chosen)
    if asked is not None and len(chosen) > 1:
        note = (f"VM {asked!r} picks every VM on its volume {volume!r}, as they move "
                f"together: {names}")  # fmt: skip
    else:
        note = f"every VM on volume {volume!r}: {names}"
    return chosen, note


def check_step(step: Step, *, source: str, volume: str, record: CopyRecord | None) -> None:
    """``--run`` follows a ``--test`` of the same volume; ``--rollback`` follows a
    ``--run``; ``--test`` finds no copy of the volume under way."""
    phase = None if record is None else record.phase
    if record is not None and record.source != source:
        raise ConflictError(f"volume {volume!r} was copied from cluster {record.source!r}, "
                            f"not {source!r}")  # fmt: skip
    if step is Step.TEST and phase is Phase.RAN:
        raise StateError(f"volume {volume!r} was copied already (--run): --rollback first "
                         "to test it again")  # fmt: skip
    if step is Step.RUN and phase is not Phase.TESTED:
        after = "" if phase is None else f" (its last step was {phase.value})"
        raise StateError(f"--run needs a --test of volume {volume!r} first{after}: 'ferry "
                         f"cluster copy-roles --from {source} --to TARGET --volume {volume} "
                         "--test'")  # fmt: skip
    if step is Step.ROLLBACK and phase is not Phase.RAN:
        raise StateError(f"nothing to roll back for volume {volume!r}: no --run of it "
                         "stands")  # fmt: skip


def check_vms(vms: Iterable[CopyVm], *, target: str, level: int) -> None:
    """None of the VMs is migrating, and C2's level runs each one (the version rule)."""
    for vm in vms:
        if vm.migrating:
            raise ConflictError(f"VM {vm.name!r} of the volume is migrating right now: wait "
                                "for its move to end, or cancel it, then try again")  # fmt: skip
        check_level(vm.name, vm.config_version, target, level)


def start_refusal(vm: str, uuid: str, cluster: str, records: Iterable[CopyRecord]) -> str | None:
    """Why ``cluster`` may not start ``vm``: another cluster owns it since a ``--run``."""
    for record in records:
        if record.phase is Phase.RAN and record.source == cluster and any(
                v.uuid == uuid for v in record.vms):  # fmt: skip
            return (
                f"VM {vm!r} belongs to cluster {record.target!r} since 'copy-roles --run' "
                f"of volume {record.volume!r}; start it there, or '--rollback' first"
            )
    return None


@dataclasses.dataclass(frozen=True)
class NodeFacts:
    """What one up node of C2 says it runs (its ``hello``): CPU models and networks.

    ``networks`` None: the node did not say (an older host); nothing is refused on it.
    """

    cpu: CpuFacts
    networks: frozenset[str] | None = None


def report(vms: Sequence[CopyVm], *, source: str, target: str, volume: str, level: int,
           nodes: Iterable[PlacementNode], network_map: Mapping[str, str],
           facts: Mapping[str, NodeFacts], unanswered: Mapping[str, str] | None = None,
           note: str = "") -> dict[str, Any]:  # fmt: skip
    """The pre-migration report; ``ok`` is False when something in it would refuse ``--run``.

    ``facts``: each up node of C2 that answered. C2's HA may restart a VM on any of
    them, so a VM's CPU model and each of its networks (mapped) must be on every one:
    a row names the nodes that lack them. ``unanswered``: up nodes that did not
    answer, node -> why; they are listed and refuse nothing (nothing is known of them).
    """
    placed = dict((d.name, r) for d, r in place_all(
        [VmDemand(vm.name, vm.memory, vm.config_version) for vm in vms], list(nodes)))  # fmt: skip
    rows: list[dict[str, Any]] = []
    ok = True
    for vm in vms:
        mapped = [network_map.get(n, n) for n in vm.networks]
        lacking = {n: sorted(node for node, f in facts.items()
                             if f.networks is not None and n not in f.networks)
                   for n in dict.fromkeys(mapped)}  # fmt: skip
        missing = [n for n, where in lacking.items() if where]
        refusals = {node: line for node, f in sorted(facts.items())
                    if (line := cpu_refusal(vm.cpu_model, f.cpu)) is not None}  # fmt: skip
        cpu_ok = not refusals
        where = placed[vm.name]
        node = where if isinstance(where, str) else None
        fits = node is not None
        row_ok = vm.config_version <= level and not missing and cpu_ok and fits
        ok = ok and row_ok
        rows.append({
            "name": vm.name, "uuid": vm.uuid, "state": vm.state, "node": vm.node,
            "config_version": vm.config_version, "level_ok": vm.config_version <= level,
            "cpu_model": vm.cpu_model, "cpu_ok": cpu_ok, "cpu_refusals": refusals,
            "networks": dict(zip(vm.networks, mapped, strict=True)), "missing_networks": missing,
            "missing_on": {n: lacking[n] for n in missing},
            "memory": vm.memory, "target_node": node,
            "capacity": "fits" if fits else str(where),
            "replication": vm.replica, "ok": row_ok,
        })  # fmt: skip
    return {"from": source, "to": target, "volume": volume, "functional_level": level,
            "picked": note, "ok": ok, "checked_nodes": sorted(facts),
            "unanswered": dict(sorted((unanswered or {}).items())), "vms": rows}  # fmt: skip


def downtime_s(stopped_at: float, started_at: float) -> float:
    """A VM's time down across ``--run`` (or ``--rollback``): stop to running again."""
    return round(max(0.0, started_at - stopped_at), 3)
