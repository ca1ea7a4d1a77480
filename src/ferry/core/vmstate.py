"""The life cycle of a VM as a pure state machine.

Theory of operation: a VM is always in one :class:`VmState`. Admin requests
(``start``, ``stop``, ``kill``, ``pause``, ``resume``, ``delete``) and things
the agent observes (``started``, ``stopped``, ``crashed``) are *operations*;
:data:`TRANSITIONS` says, for each operation, from which states it is allowed
and where it leads. :func:`transition` is the only way a state changes, so a
request in the wrong state is refused in one place with an error naming both
the state and the states that would allow it.

What QEMU reports (``query-status``) is mapped onto our states by
:func:`state_from_qemu`; a QEMU process that vanished without being asked to
is ``crashed``.
"""

from __future__ import annotations

from enum import StrEnum

from ferry.core import transitions


class VmState(StrEnum):
    OFF = "off"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    MIGRATING = "migrating"
    CRASHED = "crashed"
    # The stopped copy a replica host keeps of a replicated VM: its disks are
    # the recovery point chain, so it neither starts nor is deleted on its own
    # (replication remove / failover change it).
    REPLICA = "replica"


class VmOp(StrEnum):
    START = "start"
    STARTED = "started"
    START_FAILED = "start-failed"
    STOP = "stop"
    STOPPED = "stopped"
    KILL = "kill"
    PAUSE = "pause"
    RESUME = "resume"
    CRASHED = "crashed"
    DELETE = "delete"
    MIGRATE = "migrate"
    MIGRATE_ABORTED = "migrate-aborted"


S = VmState
_LIVE = frozenset({S.STARTING, S.RUNNING, S.PAUSED, S.STOPPING, S.MIGRATING})

# operation -> (states it is allowed in, state it leads to)
TRANSITIONS: dict[VmOp, tuple[frozenset[VmState], VmState]] = {
    VmOp.START: (frozenset({S.OFF, S.CRASHED}), S.STARTING),
    VmOp.STARTED: (frozenset({S.STARTING}), S.RUNNING),
    VmOp.START_FAILED: (frozenset({S.STARTING}), S.OFF),
    VmOp.STOP: (frozenset({S.RUNNING, S.PAUSED}), S.STOPPING),
    VmOp.STOPPED: (_LIVE, S.OFF),
    VmOp.KILL: (_LIVE | {S.CRASHED}, S.OFF),
    VmOp.PAUSE: (frozenset({S.RUNNING}), S.PAUSED),
    VmOp.RESUME: (frozenset({S.PAUSED}), S.RUNNING),
    VmOp.CRASHED: (_LIVE, S.CRASHED),
    VmOp.DELETE: (frozenset({S.OFF, S.CRASHED}), S.OFF),
    VmOp.MIGRATE: (frozenset({S.RUNNING}), S.MIGRATING),
    VmOp.MIGRATE_ABORTED: (frozenset({S.MIGRATING, S.PAUSED, S.RUNNING}), S.RUNNING),
}

# What each QEMU run state means for us. A QEMU in ``shutdown`` has a guest
# that powered itself off; the agent quits it and records ``off``.
_QEMU_STATES: dict[str, VmState] = {
    "running": S.RUNNING,
    "paused": S.PAUSED,
    "suspended": S.PAUSED,
    "debug": S.PAUSED,
    "save-vm": S.PAUSED,
    "restore-vm": S.PAUSED,
    "watchdog": S.PAUSED,
    "prelaunch": S.STARTING,
    "inmigrate": S.MIGRATING,
    "postmigrate": S.MIGRATING,
    "finish-migrate": S.MIGRATING,
    "colo": S.MIGRATING,
    "shutdown": S.OFF,
    "guest-panicked": S.CRASHED,
    "internal-error": S.CRASHED,
    "io-error": S.CRASHED,
}


def is_live(state: VmState) -> bool:
    """True while a QEMU process belongs to the VM."""
    return state in _LIVE


def allowed(state: VmState, op: VmOp) -> bool:
    return state in TRANSITIONS[op][0]


def transition(state: VmState, op: VmOp, *, vm: str = "") -> VmState:
    """Return the state ``op`` leads to from ``state``, or raise StateError."""
    return transitions.apply(TRANSITIONS, state, op, subject=f"VM {vm!r}" if vm else "the VM")


def state_from_qemu(status: str) -> VmState:
    """Map a QEMU ``query-status`` status onto a VM state."""
    return _QEMU_STATES.get(status, S.CRASHED)
