"""The one exception tree of ferry.

Every failure a user can meet is a :class:`FerryError` whose message says what
failed, for which VM or host, and what to do. Foreign exceptions (``OSError``,
``ssl.SSLError``, ``sqlite3.Error``, QMP errors) are translated where they
enter, in the adapter that met them, with ``raise ... from exc``.
``asyncio.CancelledError`` is not an error and is never swallowed (see
:func:`ferry.core.tasks.cancel_and_wait`).

::

    FerryError                      code
     +-- InvalidInputError          invalid-input     bad size, name, path, flag
     +-- NotFoundError              not-found         unknown VM, host, file
     +-- ConflictError              conflict          duplicate name, VM in use
     |    +-- NoPlacementError      no-placement      no cluster node may take the VM
     +-- StateError                 wrong-state       operation not allowed now
     +-- VersionError               version           config version / data dir
     +-- AuthError                  forbidden         certificate refused, wrong role
     |    +-- ThumbprintMismatchError thumbprint-mismatch  not the pinned certificate
     +-- ConnectionFailedError      unreachable       agent cannot be reached
     +-- PkiError                   pki               certificates cannot be made/read
     +-- QemuError                  qemu              QEMU failed to start or answer
     +-- CatalogError               catalog           the SQLite catalog failed
     +-- StorageError               storage           a file or dir cannot be read/written
     |    +-- StorageFullError      storage-full      its file system is full (ENOSPC, EDQUOT)
     +-- GuestBuildError            guest-build       the test guest cannot be built/read
     +-- ConfigError                config            a config file is missing or invalid
     +-- DeltaCorruptError          delta-corrupt     a replication delta arrived damaged
     +-- ReplicationStoppedError    replication-stopped  a retry cannot cure it; admin acts
     +-- MoveFailedError            move-failed       a move step failed; the move is undone
     +-- JobCancelledError          job-cancelled     a job stops where its cancel was honoured
     +-- StoreUnavailableError      store-unavailable the cluster store (etcd) cannot be reached
     +-- LeaseLostError             lease-lost        a node's cluster lease expired or was revoked
     +-- FenceGuardError            fence-guard       the fence guard cannot be started or reached
     +-- GuestAgentError            guest-agent       the guest agent is absent, silent or refused
     +-- NetworkError               network           a bridge, tap or namespace cannot be made/used

The ``code`` travels over the API so the CLI can rebuild the same class on
the other side.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import ClassVar


class FerryError(Exception):
    """Root of every error ferry reports to a user."""

    code: ClassVar[str] = "error"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInputError(FerryError):
    code = "invalid-input"
    http_status = 400


class NotFoundError(FerryError):
    code = "not-found"
    http_status = 404


class ConflictError(FerryError):
    code = "conflict"
    http_status = 409


class NoPlacementError(ConflictError):
    """No node of a cluster may take VM ``vm``; ``reasons`` says why not, node by node.

    Made by :func:`ferry.core.cluster.placement.place`; rebuilt from the API
    with the message only.
    """

    code = "no-placement"

    def __init__(self, message: str, *, vm: str = "",
                 reasons: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.vm = vm
        self.reasons = dict(reasons or {})


class StateError(FerryError):
    """An operation was asked for in a state that does not allow it.

    A life cycle table (:mod:`ferry.core.transitions`) raises it with typed
    fields: ``op`` (what was asked), ``state`` (where the thing is) and
    ``required`` (the states that would allow it), and the message is made from
    them. Other refusals pass only a message; their fields are empty, as they
    are for an error rebuilt from the API.
    """

    code = "wrong-state"
    http_status = 409

    def __init__(
        self,
        message: str | None = None,
        *,
        subject: str = "",
        op: StrEnum | None = None,
        state: StrEnum | None = None,
        required: Iterable[StrEnum] = (),
    ) -> None:
        self.subject = subject
        self.op = op
        self.state = state
        self.required = tuple(sorted(required, key=lambda s: s.value))
        if message is None:
            wanted = ", ".join(s.value for s in self.required)
            message = f"cannot {op} {subject}: it is {state} (needs: {wanted})"
        super().__init__(message)


class VersionError(FerryError):
    code = "version"
    http_status = 409


class AuthError(FerryError):
    code = "forbidden"
    http_status = 403


class ThumbprintMismatchError(AuthError):
    """The agent presented a valid certificate, but not the pinned one (``found``)."""

    code = "thumbprint-mismatch"

    def __init__(self, message: str, *, found: str = "") -> None:
        super().__init__(message)
        self.found = found


class ConnectionFailedError(FerryError):
    code = "unreachable"
    http_status = 502


class PkiError(FerryError):
    code = "pki"
    http_status = 500


class QemuError(FerryError):
    code = "qemu"
    http_status = 500


class CatalogError(FerryError):
    """SQLite refused or failed ``operation`` (e.g. "record VM 'web'") on the catalog."""

    code = "catalog"
    http_status = 500

    def __init__(self, message: str, *, operation: str = "") -> None:
        super().__init__(message)
        self.operation = operation


class StorageError(FerryError):
    """A file or directory on this host could not be read or written (``path``)."""

    code = "storage"
    http_status = 500

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class StorageFullError(StorageError):
    """No space (or quota) left where ``path`` is written; the message says how much is free."""

    code = "storage-full"


class GuestBuildError(FerryError):
    code = "guest-build"
    http_status = 500


class ConfigError(FerryError):
    code = "config"
    http_status = 500


class DeltaCorruptError(FerryError):
    """A delta stream arrived corrupt or cut short; the primary resends it."""

    code = "delta-corrupt"
    http_status = 400


class ReplicationStoppedError(FerryError):
    """A replication failure no retry cures; the relationship goes to ``error`` until an admin acts.

    For example the replica's certificate changed, its version refuses, or its
    copy of the VM is gone. The message says which and what to do.
    """

    code = "replication-stopped"
    http_status = 409


class MoveFailedError(FerryError):
    """A step of a live move failed; the source undoes the move and the job reports this."""

    code = "move-failed"
    http_status = 500


class JobCancelledError(FerryError):
    """A job whose cancel was asked for reached a safe point; its runner undoes and ends it.

    Raised by ``JobRegistry.checkpoint`` inside the job's own work, so the
    work stops where stopping is safe instead of wherever a task cancel would
    strike; the job then ends ``cancelled``.
    """

    code = "job-cancelled"
    http_status = 409


class StoreUnavailableError(FerryError):
    """The cluster's store (etcd) did not answer; the message names the URL(s)."""

    code = "store-unavailable"
    http_status = 503


class LeaseLostError(FerryError):
    """A node's cluster lease is gone (expired or revoked): it must fence itself."""

    code = "lease-lost"
    http_status = 409


class FenceGuardError(FerryError):
    """The node's fence guard process cannot be started, reached or understood."""

    code = "fence-guard"
    http_status = 503


class GuestAgentError(FerryError):
    """The QEMU guest agent of VM ``vm`` cannot be reached, did not answer, or refused ``command``.

    ``error_class`` is the agent's own error class (e.g. ``GenericError``)
    when it answered with an error, else empty.
    """

    code = "guest-agent"
    http_status = 502

    def __init__(self, message: str, *, vm: str = "", command: str = "",
                 error_class: str = "") -> None:  # fmt: skip
        super().__init__(message)
        self.vm = vm
        self.command = command
        self.error_class = error_class


class NetworkError(FerryError):
    """``ip`` could not make, change or remove a bridge, tap or network namespace."""

    code = "network"
    http_status = 500


_BY_CODE: dict[str, type[FerryError]] = {
    cls.code: cls
    for cls in (
        FerryError,
        InvalidInputError,
        NotFoundError,
        ConflictError,
        NoPlacementError,
        StateError,
        VersionError,
        AuthError,
        ThumbprintMismatchError,
        ConnectionFailedError,
        PkiError,
        QemuError,
        CatalogError,
        StorageError,
        StorageFullError,
        GuestBuildError,
        ConfigError,
        DeltaCorruptError,
        ReplicationStoppedError,
        MoveFailedError,
        JobCancelledError,
        StoreUnavailableError,
        LeaseLostError,
        FenceGuardError,
        GuestAgentError,
        NetworkError,
    )
}


def error_from_code(code: str, message: str) -> FerryError:
    """Rebuild the error class named by an API error ``code``."""
    return _BY_CODE.get(code, FerryError)(message)
