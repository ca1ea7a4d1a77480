"""Which OVMF (UEFI firmware) this host has, read from QEMU's firmware descriptors.

The descriptors (``*.json`` in ``/usr/share/qemu/firmware``, Debian's ``ovmf``
installs them) are the interface QEMU's docs define for management tools;
:func:`ferry.core.firmware.pick_uefi` chooses among them. A descriptor that
cannot be read or parsed is skipped, and so is one whose files are gone.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ferry.core.firmware import INSTALL_HINT, UefiFirmware, pick_uefi
from ferry.errors import ConflictError

log = logging.getLogger(__name__)

DESCRIPTOR_DIR = Path("/usr/share/qemu/firmware")


def find_uefi(descriptor_dir: Path = DESCRIPTOR_DIR) -> UefiFirmware | None:
    """The UEFI build this host offers, or None (OVMF is not installed)."""
    descriptors: list[tuple[str, dict[str, Any]]] = []
    try:
        paths = sorted(descriptor_dir.glob("*.json"))
    except OSError:
        return None
    for path in paths:
        try:
            parsed = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.debug("firmware descriptor %s skipped: %s", path, exc)
            continue
        if isinstance(parsed, dict):
            descriptors.append((path.name, parsed))
    usable = [(name, desc) for name, desc in descriptors if _files_exist(desc)]
    return pick_uefi(usable)


def _files_exist(desc: dict[str, Any]) -> bool:
    mapping = desc.get("mapping")
    if not isinstance(mapping, dict):
        return False
    for key in ("executable", "nvram-template"):
        entry = mapping.get(key)
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not Path(name).is_file():
            return False
    return True


def check_firmware_here(firmware: str, descriptor_dir: Path, *, host: str, vm: str) -> None:
    """Refuse, before a move, import, replica or failover starts, a UEFI VM on a host
    without OVMF (its QEMU could not start there)."""
    if firmware == "uefi" and find_uefi(descriptor_dir) is None:
        raise ConflictError(f"VM {vm!r} boots through UEFI but host {host!r} has no UEFI "
                            f"firmware (OVMF): {INSTALL_HINT} there first")  # fmt: skip
