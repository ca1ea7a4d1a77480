"""CPU models: which one a VM runs, and whether a host can run it.

Pure: no I/O. A VM's ``cpu_model`` (``VmSpec.cpu_model``) is a QEMU CPU model
name; ``None`` is the legacy ``max`` of catalogs made before the field. A
host's facts (:class:`CpuFacts`) are QEMU's ``query-cpu-definitions`` under
the host's accelerator, probed once per agent start (``host/facts.py``),
narrowed by ``host.toml``'s ``cpu_models`` if the admin set it.
:func:`cpu_refusal` is the one check that a move, a failover (planned,
unplanned, test), an import and ``vm create`` make before anything starts.

Why a named model by default on KVM (docs/architecture.md, "CPU models"):
``max`` and ``host`` show the guest whatever the host has, so two hosts
differ and a live migration between them can fail or crash the guest; a
named model is the same CPU on every host that can run it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from ferry.errors import ConflictError, InvalidInputError

LEGACY_MODEL = "max"  # what a VM without cpu_model runs (catalogs before the field)
# QEMU 7.2 has no x86-64-v2-AES (that is Proxmox's); Westmere-v1 is the
# oldest QEMU model with the x86-64-v2 level (SSE4.2, POPCNT, CX16, SSSE3)
# plus AES-NI and PCLMULQDQ: Intel since 2010, AMD since 2011 (Bulldozer).
# Versioned, so it never changes meaning under a later machine type.
KVM_DEFAULT = "Westmere-v1"
# Under TCG "max" is what boots the test guest here (DESIGN.md section 4).
TCG_DEFAULT = "max"
# Models that mean "whatever this host has": QEMU's enforce means nothing there.
HOST_DEPENDENT = frozenset({"max", "host"})
# A model name as QEMU spells them: letters, digits, '.', '_', '-'; never a comma
# (that would add options such as features). Stored specs and folders obey it too.
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME_RE = re.compile(MODEL_PATTERN)
_SHOWN_FEATURES = 12  # a refusal line names this many missing features at most


class CpuModel(BaseModel):
    """One CPU model as a host sees it (``host show --json`` -> ``cpu_models``)."""

    model_config = ConfigDict(frozen=True)

    name: str
    # QEMU can run it here with every feature it defines (and host.toml allows it).
    runnable: bool
    # The model's features this host's accelerator cannot give (QEMU's list).
    unavailable_features: tuple[str, ...] = ()
    # False when host.toml's cpu_models leaves it out.
    allowed: bool = True


class CpuFacts(BaseModel):
    """The CPU models one host can run. No models: not known (an older host)."""

    model_config = ConfigDict(frozen=True)

    host: str
    models: tuple[CpuModel, ...] = ()

    def find(self, name: str) -> CpuModel | None:
        for model in self.models:
            if model.name == name:
                return model
        return None


def effective_model(cpu_model: str | None) -> str:
    """The model a VM runs: its own, or the legacy ``max``."""
    return cpu_model or LEGACY_MODEL


def default_model(accelerator: str) -> str:
    """The model a new VM gets when ``--cpu-model`` is not given."""
    return KVM_DEFAULT if accelerator == "kvm" else TCG_DEFAULT


def check_model_name(name: str) -> str:
    """A model name as QEMU spells them; never options (``max,+x`` would add features)."""
    if not _NAME_RE.fullmatch(name):
        raise InvalidInputError(
            f"invalid CPU model {name!r}: a QEMU model name such as {KVM_DEFAULT} "
            "('ferry host show H --json' lists cpu_models)"
        )
    return name


def cpu_argument(cpu_model: str | None) -> str:
    """QEMU's ``-cpu`` value. A named model runs with ``enforce``: QEMU refuses to
    start rather than quietly drop a feature, so the guest sees one CPU everywhere."""
    model = effective_model(cpu_model)
    return model if model in HOST_DEPENDENT else f"{model},enforce"


def parse_definitions(
    reply: Iterable[Mapping[str, object]], *, allowed: Sequence[str] = ()
) -> tuple[CpuModel, ...]:
    """QMP ``query-cpu-definitions``' reply as :class:`CpuModel` s, sorted by name.

    ``allowed``: host.toml's ``cpu_models`` (empty: every model QEMU has).
    """
    permit = set(allowed)
    models = []
    for entry in reply:
        name = str(entry["name"])
        raw = entry.get("unavailable-features") or []
        missing = tuple(str(f) for f in raw) if isinstance(raw, list) else ()
        ok = not permit or name in permit
        models.append(CpuModel(name=name, runnable=ok and not missing,
                               unavailable_features=missing, allowed=ok))  # fmt: skip
    return tuple(sorted(models, key=lambda m: m.name.lower()))


def cpu_refusal(model: str | None, host_facts: CpuFacts) -> str | None:
    """Why ``host_facts.host`` cannot run CPU model ``model`` (one line), or None if it can.

    ``model`` None is the legacy ``max``. Facts without models (a host that
    does not report them) refuse nothing.
    """
    name = effective_model(model)
    if not host_facts.models:
        return None
    host = host_facts.host
    found = host_facts.find(name)
    if found is None:
        return (f"host {host!r} has no CPU model {name!r} (its QEMU does not know it; "
                f"'ferry host show {host} --json' lists cpu_models)")  # fmt: skip
    if not found.allowed:
        offered = [m.name for m in host_facts.models if m.allowed]
        return (f"host {host!r} does not offer CPU model {name!r}: its host.toml cpu_models "
                f"allows only {', '.join(offered) or 'none'}")  # fmt: skip
    if found.unavailable_features:
        missing = list(found.unavailable_features)
        shown = ", ".join(missing[:_SHOWN_FEATURES])
        more = (
            f" and {len(missing) - _SHOWN_FEATURES} more" if len(missing) > _SHOWN_FEATURES else ""
        )
        return (f"host {host!r} cannot run CPU model {name!r}: it lacks "
                f"{'feature' if len(missing) == 1 else 'features'} {shown}{more}")  # fmt: skip
    return None


def check_cpu(model: str | None, host_facts: CpuFacts, *, vm: str) -> None:
    """Raise the refusal of :func:`cpu_refusal` for VM ``vm``, if there is one."""
    refusal = cpu_refusal(model, host_facts)
    if refusal is not None:
        raise ConflictError(f"VM {vm!r}: {refusal}")
