"""Configuration versions, functional levels and the rules between them.

A VM's *configuration version* fixes the virtual hardware it sees: it maps to
a pinned QEMU machine type, so a guest keeps identical hardware on every host
that runs it, whatever QEMU that host has. A host's *functional level* is the
highest configuration version it runs; an admin may set it lower than the
software's maximum while a pool of hosts is upgraded, so VMs created on the
new hosts can still move to the old ones.

Data-dir schema versions live here too: an agent refuses a data dir written by
a newer ferry, naming both versions.
"""

from __future__ import annotations

from ferry.errors import InvalidInputError, VersionError

# config version -> QEMU machine type. Append only: a released version's
# machine type never changes.
MACHINE_TYPES: dict[int, str] = {
    1: "pc-q35-7.0",
    2: "pc-q35-7.1",
    3: "pc-q35-7.2",
}

MIN_CONFIG_VERSION = min(MACHINE_TYPES)
MAX_CONFIG_VERSION = max(MACHINE_TYPES)

# Schema version of the agent's data dir (catalog and files).
DATA_SCHEMA_VERSION = 5


def machine_type(config_version: int) -> str:
    try:
        return MACHINE_TYPES[config_version]
    except KeyError:
        raise VersionError(
            f"configuration version {config_version} is unknown to this ferry "
            f"(it knows {MIN_CONFIG_VERSION}..{MAX_CONFIG_VERSION})"
        ) from None


def check_functional_level(level: int) -> int:
    """Validate a host's configured functional level."""
    if not MIN_CONFIG_VERSION <= level <= MAX_CONFIG_VERSION:
        raise InvalidInputError(
            f"functional level {level} is outside what this ferry supports "
            f"({MIN_CONFIG_VERSION}..{MAX_CONFIG_VERSION})"
        )
    return level


def supported_range(functional_level: int) -> tuple[int, int]:
    """Configuration versions a host at ``functional_level`` runs."""
    return (MIN_CONFIG_VERSION, functional_level)


def check_host_runs(config_version: int, functional_level: int, *, host: str, vm: str) -> None:
    """Refuse a VM whose configuration version the host cannot run."""
    low, high = supported_range(functional_level)
    if not low <= config_version <= high:
        raise VersionError(
            f"host {host!r} runs configuration versions {low}..{high}; "
            f"VM {vm!r} has configuration version {config_version}"
        )


def check_data_schema(found: int, *, data_dir: str) -> None:
    """Refuse a data dir written by a newer ferry."""
    if found > DATA_SCHEMA_VERSION:
        raise VersionError(
            f"data dir {data_dir} has schema version {found}, written by a newer ferry; "
            f"this ferry understands up to schema version {DATA_SCHEMA_VERSION}: "
            "install the newer ferry or point the agent at another data dir"
        )
