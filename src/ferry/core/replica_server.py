"""Which primaries a replica server accepts, and where their VMs go.

Pure. A host is not a replica server until an admin enables it. Then every
primary must be allowed: by an *allow entry* whose pattern matches the primary's
certificate name (shell-style, e.g. ``host-*`` or ``*.dc1.example``), the first
match winning, with that entry's storage dir (or the server's default) and
trust group; or by ``allow_any`` (any host certificate of this CA) into the
default storage. The certificate has been verified by TLS before these rules
run; they only decide *whether* and *where*.
"""

from __future__ import annotations

import fnmatch
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ferry.errors import AuthError, InvalidInputError

_PATTERN_RE = re.compile(r"^[a-z0-9*?.\[\]-]{1,253}$")
_GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class AllowEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    pattern: str
    storage: str | None = None
    trust_group: str | None = None

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        if not _PATTERN_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a host name pattern (a-z, 0-9, '.', '-', * ?)")
        return value

    @field_validator("trust_group")
    @classmethod
    def _group(cls, value: str | None) -> str | None:
        if value is not None and not _GROUP_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a trust group name")
        return value


class ReplicaServerSettings(BaseModel):
    """A host's replica server settings, as stored and as shown."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = False
    storage: str | None = None
    allow: tuple[AllowEntry, ...] = Field(default=(), max_length=256)
    allow_any: bool = False


class Admission(BaseModel):
    """A primary's admission: where its VMs are stored, under which trust group."""

    model_config = ConfigDict(frozen=True)

    storage: str
    trust_group: str | None
    rule: str


def check_settings(settings: ReplicaServerSettings) -> ReplicaServerSettings:
    """An enabled server needs a default storage dir and someone to accept."""
    if not settings.enabled:
        return settings
    if not settings.storage:
        raise InvalidInputError("a replica server needs --storage DIR for replica VMs")
    for path in [settings.storage] + [e.storage for e in settings.allow if e.storage]:
        if not path.startswith("/") or ".." in path.split("/"):
            raise InvalidInputError(f"storage dir {path!r} must be absolute, without '..'")
    if not settings.allow and not settings.allow_any:
        raise InvalidInputError(
            "a replica server must accept someone: give --allow PATTERN or --allow-any"
        )
    return settings


def admit(settings: ReplicaServerSettings, primary: str, *, server: str) -> Admission:
    """Where VMs from host ``primary`` go on ``server``, or a refusal saying why."""
    if not settings.enabled:
        raise AuthError(
            f"host {server!r} is not a replica server; enable it with "
            f"'ferry replica-server enable --host {server} --storage DIR --allow PATTERN'"
        )
    assert settings.storage is not None  # check_settings guarantees it
    for entry in settings.allow:
        if fnmatch.fnmatchcase(primary, entry.pattern):
            return Admission(storage=entry.storage or settings.storage,
                             trust_group=entry.trust_group, rule=entry.pattern)  # fmt: skip
    if settings.allow_any:
        return Admission(storage=settings.storage, trust_group=None, rule="any")
    raise AuthError(
        f"host {server!r} does not accept replication from {primary!r}: no allow entry "
        "matches it (add one with 'ferry replica-server enable ... --allow PATTERN')"
    )
