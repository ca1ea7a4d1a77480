"""Which hosts can take a VM in a live move, and why not: the destination picker's rule.

Advisory only: the source agent checks again when the move starts and its
refusal is shown as one line. The rules, in order: the host must answer;
it is not the VM's own host; it does not hold the VM's replica; its
functional level is at least the VM's configuration version (a host runs
configuration versions up to its level); it has every network the VM's
NICs name (when the host reports its networks); it runs the VM's CPU model
(``core/cpu_models.cpu_refusal``, when the host reports its models).
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from ferry.core.cpu_models import CpuFacts, CpuModel, cpu_refusal
from ferry.web.operations import HostRow


@dataclass(frozen=True)
class Target:
    host: str
    ok: bool
    reason: str  # why not, or what the host offers


def _networks(facts: dict[str, Any]) -> set[str] | None:
    found = facts.get("networks")
    if found is None:
        return None
    return {n if isinstance(n, str) else str(n.get("name")) for n in found}


def _cpu_refusal(vm: dict[str, Any], row: HostRow) -> str | None:
    assert row.facts is not None
    models = tuple(CpuModel.model_validate(m) for m in row.facts.get("cpu_models") or [])
    return cpu_refusal(vm.get("cpu_model"), CpuFacts(host=row.name, models=models))


def move_targets(vm: dict[str, Any], hosts: list[HostRow], *,
                 replica_hosts: AbstractSet[str] = frozenset()) -> list[Target]:  # fmt: skip
    """One :class:`Target` per known host, in the order given."""
    version = int(vm["config_version"])
    wanted = {nic["network"] for nic in vm.get("nics") or [] if nic.get("network")}
    targets = []
    for row in hosts:
        if row.name == vm["host"]:
            targets.append(Target(row.name, False, "the VM runs here"))
        elif row.facts is None:
            targets.append(Target(row.name, False, f"host down: {row.error}"))
        elif row.name in replica_hosts:
            targets.append(Target(row.name, False, "holds the VM's replica"))
        elif int(row.facts["functional_level"]) < version:
            level = row.facts["functional_level"]
            targets.append(Target(row.name, False, f"functional level {level} is below the VM's "
                                  f"configuration version {version}"))  # fmt: skip
        else:
            have = _networks(row.facts)
            missing = sorted(wanted - have) if have is not None else []
            cpu = _cpu_refusal(vm, row)
            if missing:
                targets.append(Target(row.name, False, f"lacks network {', '.join(missing)}"))
            elif cpu is not None:
                targets.append(Target(row.name, False, cpu))
            else:
                level = row.facts["functional_level"]
                targets.append(Target(row.name, True, f"functional level {level}, "
                                      f"{row.facts['accelerator']}"))  # fmt: skip
    return targets
