"""The life cycle of a VM as a pure state machine.

Theory of operation: a VM is always in one :class:`VmState`. Everything that
changes it is an *operation* (:class:`VmOp`): what an admin asks for
(``start``, ``stop``, ``kill``, ``pause``, ``resume``, ``delete``), the steps
of the agent's own work (``started``, ``stopped``, ``migrate``, ``arrived``,
replication's ``make-replica`` and ``release``, ...) and what QEMU says about
itself (the ``observed-*`` operations and ``crashed``). :data:`TRANSITIONS`
says, for each operation, from which states it is allowed and where it leads;
:func:`transition` reads it and is the only rule by which a state changes, so
an operation in the wrong state is refused in one place with a
:class:`~ferry.errors.StateError` naming both the state and the states that
would allow it. The host writes a state only through one writer that applies
an operation by this table (``ferry.host.vms.states``).

QEMU's run state (:class:`QemuStatus`, QEMU's ``RunState`` enum as
``query-status`` reports it) is mapped onto an operation by :func:`observed`:
what QEMU says is the truth, so observing is allowed in every state in which a
QEMU may belong to the VM, and only there. A QEMU that vanished without being
asked to is ``crashed``. :func:`launched` and :func:`confirmed` name the
operation a step records once it has asked QEMU how it went: the step's own
operation when QEMU agrees, what QEMU says otherwise.

:class:`QemuStatus` lives here rather than in the QEMU adapter so that this
module stays free of I/O and imports point one way; the adapter maps QMP's
strings onto it where they enter (``ferry.adapters.qemu``).
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


class QemuStatus(StrEnum):
    """QEMU's run state (QAPI ``RunState``, QEMU 7.2), as ``query-status`` says it."""

    DEBUG = "debug"
    INMIGRATE = "inmigrate"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"
    PRELAUNCH = "prelaunch"
    FINISH_MIGRATE = "finish-migrate"
    RESTORE_VM = "restore-vm"
    RUNNING = "running"
    SAVE_VM = "save-vm"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    GUEST_PANICKED = "guest-panicked"
    COLO = "colo"
    # Not QEMU's: any status a newer QEMU may add. We take it for a crash.
    UNKNOWN = "unknown"

    @classmethod
    def _missing_(cls, value: object) -> QemuStatus:
        return cls.UNKNOWN


class VmOp(StrEnum):
    # asked for by an admin
    START = "start"
    STOP = "stop"
    KILL = "kill"
    PAUSE = "pause"
    RESUME = "resume"
    DELETE = "delete"
    # steps of the agent's own work
    STARTED = "started"  # the QEMU a start launched runs the guest
    STARTED_PAUSED = "started-paused"  # ... holds it stopped (-S), as asked
    START_FAILED = "start-failed"
    STOPPED = "stopped"  # the VM's QEMU ended on purpose, or after its guest powered off
    CRASHED = "crashed"  # the VM's QEMU vanished unasked, or cannot be reached
    MIGRATE = "migrate"  # a move (or a refresh to a fresh QEMU) begins here
    MIGRATE_ABORTED = "migrate-aborted"  # ... was undone: the VM runs here as before
    ARRIVED = "arrived"  # the moved VM resumed here (a move's destination, a fresh QEMU)
    MAKE_REPLICA = "make-replica"  # the VM here is (again) replication's replica copy
    RELEASE = "release"  # the replica copy becomes a VM of its own (failover, remove)
    # what QEMU says (on attach, or after a STOP/RESUME event); see observed()
    OBSERVED_RUNNING = "observed-running"
    OBSERVED_PAUSED = "observed-paused"
    OBSERVED_PRELAUNCH = "observed-prelaunch"
    OBSERVED_MIGRATING = "observed-migrating"


S = VmState
_LIVE = frozenset({S.STARTING, S.RUNNING, S.PAUSED, S.STOPPING, S.MIGRATING})
# A QEMU may belong to the VM: it is live, or crashed with its QEMU kept (a
# panicked guest's QEMU waits, paused, until the VM is killed or started).
_ATTACHED = _LIVE | {S.CRASHED}
_AT_REST = frozenset({S.OFF, S.CRASHED})

# operation -> (states it is allowed in, state it leads to)
TRANSITIONS: dict[VmOp, tuple[frozenset[VmState], VmState]] = {
    VmOp.START: (_AT_REST, S.STARTING),
    VmOp.STOP: (frozenset({S.RUNNING, S.PAUSED}), S.STOPPING),
    VmOp.KILL: (_ATTACHED, S.OFF),
    VmOp.PAUSE: (frozenset({S.RUNNING}), S.PAUSED),
    VmOp.RESUME: (frozenset({S.PAUSED}), S.RUNNING),
    VmOp.DELETE: (_AT_REST, S.OFF),
    VmOp.STARTED: (frozenset({S.STARTING}), S.RUNNING),
    VmOp.STARTED_PAUSED: (frozenset({S.STARTING}), S.PAUSED),
    VmOp.START_FAILED: (frozenset({S.STARTING}), S.OFF),
    VmOp.STOPPED: (_ATTACHED, S.OFF),
    VmOp.CRASHED: (_ATTACHED, S.CRASHED),
    VmOp.MIGRATE: (frozenset({S.RUNNING}), S.MIGRATING),
    # Undoing a move after an agent restart finds the QEMU re-attached, so
    # running or paused (pre-switch-over) as well as migrating.
    VmOp.MIGRATE_ABORTED: (frozenset({S.MIGRATING, S.PAUSED, S.RUNNING}), S.RUNNING),
    VmOp.ARRIVED: (frozenset({S.MIGRATING}), S.RUNNING),
    # Adopting an existing VM as the base of a chain, or cancelling a failover
    # (after a restart the VM may still be the replica).
    VmOp.MAKE_REPLICA: (_AT_REST | {S.REPLICA}, S.REPLICA),
    # Failing over, or removing replication (which keeps the copy as a VM).
    VmOp.RELEASE: (_AT_REST | {S.REPLICA}, S.OFF),
    VmOp.OBSERVED_RUNNING: (_ATTACHED, S.RUNNING),
    VmOp.OBSERVED_PAUSED: (_ATTACHED, S.PAUSED),
    VmOp.OBSERVED_PRELAUNCH: (_ATTACHED, S.STARTING),
    VmOp.OBSERVED_MIGRATING: (_ATTACHED, S.MIGRATING),
}

# What each QEMU run state means for us, as the operation that records it. A
# QEMU in ``shutdown`` has a guest that powered itself off (we run QEMU with
# -no-shutdown); the agent quits it and records ``off``.
OBSERVED: dict[QemuStatus, VmOp] = {
    QemuStatus.RUNNING: VmOp.OBSERVED_RUNNING,
    QemuStatus.PAUSED: VmOp.OBSERVED_PAUSED,
    QemuStatus.SUSPENDED: VmOp.OBSERVED_PAUSED,
    QemuStatus.DEBUG: VmOp.OBSERVED_PAUSED,
    QemuStatus.SAVE_VM: VmOp.OBSERVED_PAUSED,
    QemuStatus.RESTORE_VM: VmOp.OBSERVED_PAUSED,
    QemuStatus.WATCHDOG: VmOp.OBSERVED_PAUSED,
    QemuStatus.PRELAUNCH: VmOp.OBSERVED_PRELAUNCH,
    QemuStatus.INMIGRATE: VmOp.OBSERVED_MIGRATING,
    QemuStatus.POSTMIGRATE: VmOp.OBSERVED_MIGRATING,
    QemuStatus.FINISH_MIGRATE: VmOp.OBSERVED_MIGRATING,
    QemuStatus.COLO: VmOp.OBSERVED_MIGRATING,
    QemuStatus.SHUTDOWN: VmOp.STOPPED,
    QemuStatus.GUEST_PANICKED: VmOp.CRASHED,
    QemuStatus.INTERNAL_ERROR: VmOp.CRASHED,
    QemuStatus.IO_ERROR: VmOp.CRASHED,
    QemuStatus.UNKNOWN: VmOp.CRASHED,
}


def is_live(state: VmState) -> bool:
    """True while a QEMU process belongs to the VM."""
    return state in _LIVE


def may_have_qemu(state: VmState) -> bool:
    """True if a QEMU may belong to the VM (live, or crashed with its QEMU kept)."""
    return state in _ATTACHED


def allowed(state: VmState, op: VmOp) -> bool:
    return state in TRANSITIONS[op][0]


def transition(state: VmState, op: VmOp, *, vm: str = "") -> VmState:
    """Return the state ``op`` leads to from ``state``, or raise StateError."""
    return transitions.apply(TRANSITIONS, state, op, subject=f"VM {vm!r}" if vm else "the VM")


def observed(status: QemuStatus) -> VmOp:
    """The operation that records what QEMU says about itself."""
    return OBSERVED[status]


def state_from_qemu(status: QemuStatus) -> VmState:
    """Map a QEMU ``query-status`` status onto a VM state."""
    return TRANSITIONS[observed(status)][1]


def confirmed(op: VmOp, status: QemuStatus) -> VmOp:
    """``op`` if QEMU's status agrees with the state it leads to, else what QEMU says."""
    return op if state_from_qemu(status) is TRANSITIONS[op][1] else observed(status)


def launched(status: QemuStatus, *, paused: bool = False) -> VmOp:
    """What a start records once the QEMU it launched answers."""
    if paused and status is QemuStatus.PRELAUNCH:
        return VmOp.STARTED_PAUSED  # -S: QEMU says "prelaunch"; for us the guest is paused
    return confirmed(VmOp.STARTED, status)
