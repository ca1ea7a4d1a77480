"""Live migration as a pure state machine, plus the rules a move obeys.

Theory of operation: a move is a job on the *source* host that walks the
phases below. Everything up to ``switching-over`` can fail or be cancelled,
and then the VM keeps running on the source and the destination is cleaned
up. ``switching-over`` is the one point of no return: the source QEMU has
stopped and sent its last pages; the destination resumes, or, if it cannot,
the source takes the VM back. A move never leaves two running copies: the
source resumes only after the destination said (or proved by restarting) that
its copy is gone.

::

    queued -> preparing -> copying-disks -> copying-memory -> switching-over -> done
       \\__________\\______________\\________________\\______-> failed | cancelled

The destination records its side as an ``incoming`` job whose state is one of
``receiving`` (QEMU waits for the stream), ``done`` (resumed, owns the VM) or
``aborted`` (QEMU gone, disks and catalog entry removed)::

    receiving --resume--> done
        \\------abort---> aborted

:data:`INCOMING` says which operation (:class:`IncomingOp`) is allowed in
which state and where it leads; :func:`incoming_step` applies it and is the
only way an incoming job's state changes. ``finish`` and ``abort`` asked again
after the end report the outcome instead (a retried call is not an error).
"""

from __future__ import annotations

from enum import StrEnum

from ferry.core import transitions
from ferry.errors import InvalidInputError, StateError


class Phase(StrEnum):
    QUEUED = "queued"
    PREPARING = "preparing"
    COPYING_DISKS = "copying-disks"
    COPYING_MEMORY = "copying-memory"
    SWITCHING_OVER = "switching-over"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class IncomingState(StrEnum):
    RECEIVING = "receiving"
    DONE = "done"
    ABORTED = "aborted"


class IncomingOp(StrEnum):
    """What may happen to the destination's side of a move."""

    RECEIVE_FILE = "receive a file for"  # the kernel or initrd arrives
    LAUNCH = "launch"  # QEMU starts, waiting for the streams
    RESUME = "resume"  # the stream is in and the VM runs here
    ABORT = "abort"  # every trace of the VM is removed again


class Storage(StrEnum):
    AUTO = "auto"
    SHARED = "shared"
    COPY = "copy"


P = Phase
FINAL = frozenset({P.DONE, P.FAILED, P.CANCELLED})
_ABORTABLE = frozenset({P.QUEUED, P.PREPARING, P.COPYING_DISKS, P.COPYING_MEMORY})

# phase -> phases it may go to next
NEXT: dict[Phase, frozenset[Phase]] = {
    P.QUEUED: frozenset({P.PREPARING, P.FAILED, P.CANCELLED}),
    P.PREPARING: frozenset({P.COPYING_DISKS, P.COPYING_MEMORY, P.FAILED, P.CANCELLED}),
    P.COPYING_DISKS: frozenset({P.COPYING_MEMORY, P.FAILED, P.CANCELLED}),
    P.COPYING_MEMORY: frozenset({P.SWITCHING_OVER, P.FAILED, P.CANCELLED}),
    # After switch-over starts, failure means "the source took the VM back".
    P.SWITCHING_OVER: frozenset({P.DONE, P.FAILED}),
    P.DONE: frozenset(),
    P.FAILED: frozenset(),
    P.CANCELLED: frozenset(),
}


_RECEIVING = frozenset({IncomingState.RECEIVING})

# operation -> (states it is allowed in, state it leads to)
INCOMING: dict[IncomingOp, tuple[frozenset[IncomingState], IncomingState]] = {
    IncomingOp.RECEIVE_FILE: (_RECEIVING, IncomingState.RECEIVING),
    IncomingOp.LAUNCH: (_RECEIVING, IncomingState.RECEIVING),
    IncomingOp.RESUME: (_RECEIVING, IncomingState.DONE),
    IncomingOp.ABORT: (_RECEIVING, IncomingState.ABORTED),
}


def incoming_step(state: IncomingState, op: IncomingOp, *, job: str) -> IncomingState:
    """The state ``op`` leads the incoming move ``job`` to, or StateError naming both."""
    return transitions.apply(INCOMING, state, op, subject=f"incoming move {job}")


def incoming_ended(state: IncomingState) -> bool:
    return not any(state in sources for sources, _ in INCOMING.values())


def advance(current: Phase, target: Phase) -> Phase:
    if target not in NEXT[current]:
        sources = frozenset(phase for phase, nexts in NEXT.items() if target in nexts)
        raise StateError(f"a move cannot go from {current.value} to {target.value}",
                         subject="a move", op=target, state=current, required=sources)  # fmt: skip
    return target


def cancellable(phase: Phase) -> bool:
    """Cancel is honoured until the switch-over starts."""
    return phase in _ABORTABLE


def is_final(phase: Phase) -> bool:
    return phase in FINAL


def choose_storage(requested: Storage, *, visible: bool, vm: str, host: str) -> Storage:
    """Shared storage when the destination sees every disk, else a copy."""
    if requested is Storage.COPY:
        return Storage.COPY
    if visible:
        return Storage.SHARED
    if requested is Storage.SHARED:
        raise InvalidInputError(
            f"host {host!r} cannot see the disks of VM {vm!r} on a shared volume; "
            "use --storage copy (or auto), or add the volume on that host"
        )
    return Storage.COPY


def locate_on_volume(path: str, volumes: dict[str, str]) -> tuple[str, str] | None:
    """(volume name, path inside it) for a disk on one of ``volumes``."""
    for name, root in sorted(volumes.items(), key=lambda item: -len(item[1])):
        prefix = root.rstrip("/") + "/"
        if path.startswith(prefix):
            return name, path[len(prefix) :]
    return None
