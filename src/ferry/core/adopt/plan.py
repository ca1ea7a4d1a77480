"""The adoption plan: what ferry makes of a foreign VM, and what it leaves behind.

Both parsers (libvirt domains, OVF appliances) produce one
:class:`AdoptionPlan`. It names every disk by where the source document says
it is, with the format the document declares (never probed), the NICs with
their MACs on the source's network names, and ``not_carried``: one sentence
per thing of the source VM that ferry does not carry over, printed as a note
on import. Mapping the source networks onto the host's (``--network-map``)
and checking files happen later, on the host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Literal

from ferry.core.spec import NAME_RE
from ferry.errors import InvalidInputError

DiskFormat = Literal["raw", "qcow2", "vmdk", "vdi"]
DISK_FORMATS: tuple[DiskFormat, ...] = ("raw", "qcow2", "vmdk", "vdi")
Firmware = Literal["bios", "uefi"]


@dataclass(frozen=True)
class AdoptedDisk:
    """One disk of the source VM, as its document describes it.

    ``source``: an absolute host path (libvirt) or a path relative to the
    appliance's folder (OVF); None: an empty disk of ``capacity`` bytes
    (an OVF disk without a file). ``file_size``: the file's size in bytes where
    the document says it (OVF ``ovf:size``); ``capacity``: the virtual size
    it declares (OVF ``ovf:capacity``). ``subformat``: a VMDK's create type
    (``streamOptimized``, ``monolithicSparse``) as the document names it.
    """

    source: str | None
    format: DiskFormat
    target: str
    subformat: str | None = None
    file_size: int | None = None
    capacity: int | None = None


@dataclass(frozen=True)
class AdoptedNic:
    """A NIC on the source's network ``network``; ``mac`` None: ferry makes one."""

    network: str
    mac: str | None
    model: str = "virtio"


@dataclass(frozen=True)
class AdoptionPlan:
    origin: Literal["libvirt", "ovf"]
    name: str
    memory: int
    cpus: int
    disks: tuple[AdoptedDisk, ...]
    nics: tuple[AdoptedNic, ...] = ()
    uuid: str | None = None
    cpu_model: str | None = None
    firmware: Firmware = "bios"
    boot_disk: int = 0
    # libvirt direct kernel boot (absolute host paths); OVF has none.
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    display: Literal["none", "vnc"] = "none"
    # A qemu-guest-agent channel (libvirt's org.qemu.guest_agent.0).
    guest_agent: bool = False
    not_carried: tuple[str, ...] = field(default=())

    def noted(self, *notes: str) -> AdoptionPlan:
        return replace(self, not_carried=self.not_carried + notes)


def normalise_mac(raw: str, *, what: str) -> str:
    """A MAC as ``52:54:00:ab:cd:ef`` (from colons, dashes or bare hex, any case)."""
    compact = raw.strip().lower().replace(":", "").replace("-", "")
    if not re.fullmatch(r"[0-9a-f]{12}", compact):
        raise InvalidInputError(f"{what} has a malformed MAC address {raw!r}")
    mac = ":".join(compact[i : i + 2] for i in range(0, 12, 2))
    if int(compact[:2], 16) & 1:
        raise InvalidInputError(f"{what} has a multicast MAC address {raw!r}; a NIC needs unicast")
    if compact == "0" * 12:
        raise InvalidInputError(
            f"{what} has an all-zero MAC address {raw!r}; a NIC needs a real one"
        )
    return mac


def check_macs(nics: tuple[AdoptedNic, ...], *, what: str) -> None:
    seen: set[str] = set()
    for nic in nics:
        if nic.mac is None:
            continue
        if nic.mac in seen:
            raise InvalidInputError(f"{what} gives MAC {nic.mac} to two NICs")
        seen.add(nic.mac)


def adopted_name(raw: str | None, *, fallback: str) -> tuple[str, str | None]:
    """A valid ferry VM name for the source's ``raw`` name, and a note if it had to change.

    Appliance names like ``Ubuntu 22.04 (server)`` are common: runs of
    characters a ferry name may not hold become ``-``.
    """
    source = (raw or "").strip()
    if source and NAME_RE.fullmatch(source):
        return source, None
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", source).strip("-._")[:63].rstrip("-._")
    name = cleaned if cleaned and NAME_RE.fullmatch(cleaned) else fallback
    if not source:
        return name, f"the source names no VM; it is called {name!r} (choose with --name)"
    return name, f"the name {source!r} is not a ferry VM name; it is called {name!r} (--name)"


def adopted_network(raw: str, notes: list[str]) -> str:
    """The source's network name as ferry names networks (``VM Network`` -> ``VM-Network``).

    ``--network-map SRC=DST`` then names SRC this way; a note says so.
    """
    name, changed = adopted_name(raw, fallback="network")
    if changed is not None:
        notes.append(f"network {raw!r} is called {name!r} here: map it with "
                     f"--network-map {name}=NETWORK")  # fmt: skip
    return name


# Units as libvirt writes them (<memory unit=...>); OVF units are parsed in ovf.py.
_LIBVIRT_UNITS = {
    "b": 1,
    "bytes": 1,
    "kb": 1000,
    "k": 1024,
    "kib": 1024,
    "mb": 1000**2,
    "m": 1024**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "g": 1024**3,
    "gib": 1024**3,
    "tb": 1000**4,
    "t": 1024**4,
    "tib": 1024**4,
}


def libvirt_bytes(value: str | None, unit: str | None, *, what: str) -> int:
    """A libvirt scaled integer (unit defaults to KiB, as libvirt's ``<memory>`` does)."""
    if value is None or not value.strip().isdigit():
        raise InvalidInputError(f"{what} is not a whole number ({value!r})")
    scale = _LIBVIRT_UNITS.get((unit or "KiB").strip().lower())
    if scale is None:
        raise InvalidInputError(f"{what} has an unknown unit {unit!r}")
    return int(value.strip()) * scale
