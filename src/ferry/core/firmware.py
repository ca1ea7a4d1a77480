"""Firmware of a VM: BIOS (SeaBIOS) or UEFI (OVMF), and which disk it boots.

Pure: no I/O. A BIOS VM needs nothing of its own. A UEFI VM needs two flash
images: OVMF's code, read-only and the host's (``pflash0``), and its own
variable store (``pflash1``), which the guest and the firmware write (boot
entries, variables set from the OS). The store is one of the VM's disks: a
small qcow2 in ``VmSpec.disks`` at index ``VmSpec.vars_disk``, attached as
``pflash1`` and never as a guest device. So every path that carries a VM's
disks (live moves with shared or copied storage, exports, replication cycles
and their recovery points, failovers) carries its variables too, with no
code of its own.

Which OVMF build a host has is read from QEMU's firmware descriptors
(``/usr/share/qemu/firmware/*.json``, the interface libvirt uses too):
:func:`pick_uefi` chooses one from their parsed contents.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ferry.errors import InvalidInputError

Firmware = Literal["bios", "uefi"]
FIRMWARES: tuple[Firmware, ...] = ("bios", "uefi")
CODE_NODE = "fw-code"
INSTALL_HINT = "install Debian's package ovmf (apt-get install ovmf)"
# Features whose firmware needs what ferry's command line does not give:
# SMM (Secure Boot builds) and keys enrolled for Secure Boot.
_UNWANTED = frozenset({"requires-smm", "secure-boot", "enrolled-keys", "amd-sev-es"})


@dataclass(frozen=True)
class UefiFirmware:
    """One OVMF build: its code image and the template of its variable store."""

    code: str
    code_format: str
    vars_template: str
    vars_format: str


def check_firmware(value: str) -> Firmware:
    if value == "bios":
        return "bios"
    if value == "uefi":
        return "uefi"
    raise InvalidInputError(f"--firmware must be bios or uefi, not {value!r}")


def check_boot_disk(boot_disk: int, guest_disks: int) -> None:
    """``--boot-disk N`` must name one of the disks the guest sees (0 is the first)."""
    if boot_disk < 0:
        raise InvalidInputError(f"--boot-disk {boot_disk} must be 0 or more (0 is the first disk)")
    if guest_disks == 0 and boot_disk == 0:
        return
    if boot_disk >= guest_disks:
        raise InvalidInputError(
            f"--boot-disk {boot_disk} names no disk: the VM has {guest_disks} "
            f"(numbered 0..{guest_disks - 1} in the order --image and --disk were given)"
        )


def check_vars_disk(firmware: str, vars_disk: int | None, disks: int) -> None:
    """A UEFI VM has a variable store among its disks; a BIOS VM has none."""
    if firmware == "uefi" and (vars_disk is None or not 0 <= vars_disk < disks):
        raise ValueError("a UEFI VM needs vars_disk naming one of its disks")
    if firmware == "bios" and vars_disk is not None:
        raise ValueError("a BIOS VM has no UEFI variable store (vars_disk)")


def guest_disk_indexes(disks: int, vars_disk: int | None) -> list[int]:
    """Indexes into ``VmSpec.disks`` of the disks the guest sees, in its order."""
    return [i for i in range(disks) if i != vars_disk]


def pick_uefi(descriptors: Iterable[tuple[str, Mapping[str, Any]]],
              machine: str = "pc-q35-7.2") -> UefiFirmware | None:  # fmt: skip
    """The first usable UEFI build among QEMU firmware descriptors (name, parsed JSON).

    QEMU's firmware spec orders descriptors by file name (lower first).
    Usable: UEFI, a flash mapping with a variable store template, x86_64 on
    ``machine``, and none of the features this command line cannot give.
    """
    for _, desc in sorted(descriptors, key=lambda item: item[0]):
        found = _usable(desc, machine)
        if found is not None:
            return found
    return None


def _usable(desc: Mapping[str, Any], machine: str) -> UefiFirmware | None:
    if "uefi" not in _strings(desc.get("interface-types")):
        return None
    if _UNWANTED & set(_strings(desc.get("features"))):
        return None
    mapping = desc.get("mapping")
    if not isinstance(mapping, Mapping) or mapping.get("device") != "flash":
        return None
    code, template = mapping.get("executable"), mapping.get("nvram-template")
    if not isinstance(code, Mapping) or not isinstance(template, Mapping):
        return None
    targets = desc.get("targets")
    if not isinstance(targets, Sequence) or not any(
        isinstance(t, Mapping) and t.get("architecture") == "x86_64"
        and any(fnmatch.fnmatch(machine, m) for m in _strings(t.get("machines")))
        for t in targets
    ):  # fmt: skip
        return None
    paths = code.get("filename"), template.get("filename")
    if not all(isinstance(p, str) and p.startswith("/") for p in paths):
        return None
    return UefiFirmware(code=str(paths[0]), code_format=str(code.get("format", "raw")),
                        vars_template=str(paths[1]),
                        vars_format=str(template.get("format", "raw")))  # fmt: skip


def _strings(value: object) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def uefi_code_argv(code: str, code_format: str) -> list[str]:
    """The read-only block nodes of OVMF's code image (the machine's ``pflash0``)."""
    file_node = {"driver": "file", "filename": code, "node-name": f"{CODE_NODE}-file",
                 "read-only": True}  # fmt: skip
    fmt_node = {"driver": code_format, "file": f"{CODE_NODE}-file", "node-name": CODE_NODE,
                "read-only": True}  # fmt: skip
    return ["-blockdev", json.dumps(file_node, separators=(",", ":")),
            "-blockdev", json.dumps(fmt_node, separators=(",", ":"))]  # fmt: skip
