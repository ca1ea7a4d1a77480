"""The rules for an OVA (a tar of an OVF appliance) and for paths inside an appliance.

An OVA comes from outside, so its members are judged before a byte is
extracted: only regular files with relative names that stay inside the
appliance (no symlink, hard link, device, absolute name, ``..`` or a name
given twice, which would let a later member replace an earlier one). The
host reads the member headers and hands them here as :class:`TarEntry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

from ferry.errors import InvalidInputError

EntryKind = Literal["file", "dir", "symlink", "hardlink", "other"]


@dataclass(frozen=True)
class TarEntry:
    name: str
    kind: EntryKind
    size: int
    link: str = ""


def check_relative(path: str, *, what: str) -> str:
    """``path`` if it is a plain relative path that stays inside its folder."""
    if not path or "\x00" in path or "\\" in path or "://" in path or path.startswith("file:"):
        raise InvalidInputError(
            f"{what} names {path!r}; an appliance's files are plain "
            "relative paths inside its folder"
        )
    pure = PurePosixPath(path)
    if pure.is_absolute():
        raise InvalidInputError(
            f"{what} names the absolute path {path!r}; an appliance's "
            "files must lie inside its folder"
        )
    if any(part in ("..", ".") for part in path.split("/")) or "" in path.split("/"):
        raise InvalidInputError(
            f"{what} names {path!r}, which climbs out of the appliance's folder; refused"
        )
    return str(pure)


def check_entries(entries: list[TarEntry], *, what: str) -> dict[str, TarEntry]:
    """The OVA's regular files by name; refuses any member that is not safe to extract."""
    files: dict[str, TarEntry] = {}
    for entry in entries:
        if entry.kind == "symlink":
            raise InvalidInputError(
                f"{what}: member {entry.name!r} is a symbolic link (to "
                f"{entry.link!r}); an OVA holds plain files only"
            )
        if entry.kind == "hardlink":
            raise InvalidInputError(
                f"{what}: member {entry.name!r} is a hard link (to "
                f"{entry.link!r}); an OVA holds plain files only"
            )
        if entry.kind == "other":
            raise InvalidInputError(
                f"{what}: member {entry.name!r} is a device, FIFO or other "
                "special file; an OVA holds plain files only"
            )
        name = check_relative(
            entry.name.rstrip("/") if entry.kind == "dir" else entry.name, what=f"{what}: a member"
        )
        if entry.kind == "dir":
            continue
        if name in files:
            raise InvalidInputError(
                f"{what}: member {name!r} appears twice; refused (the second "
                "would replace the first)"
            )
        files[name] = entry
    return files


def descriptor(files: dict[str, TarEntry], *, what: str) -> str:
    """The one ``.ovf`` at the top of the OVA."""
    found = [name for name in files if "/" not in name and name.lower().endswith(".ovf")]
    if len(found) != 1:
        raise InvalidInputError(
            f"{what} holds {len(found)} .ovf descriptors at its top; an OVA holds exactly one"
        )
    return found[0]


def manifest_name(files: dict[str, TarEntry] | set[str], ovf_name: str) -> str | None:
    """The manifest next to the descriptor (``NAME.mf``), if the appliance has one."""
    name = ovf_name[: -len(".ovf")] + ".mf"
    return name if name in files else None
