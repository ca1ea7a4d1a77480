"""Carrying a plan out: each step's life cycle and the resume decisions, as pure logic.

Theory of operation: ``ferry plan apply`` walks the plan's steps in order and
records each step's state in a state file beside the plan, so a second run
(after Ctrl-C, a killed client or a restarted agent) knows what is done. A
step starts ``pending``; it is ``running`` from the moment its first job was
asked for (the record holds the job's id and host) until it ends ``done`` or
``failed``::

    pending --start--> running --finish--> done
                       running --fail----> failed
                       running --lose----> pending   (its job ended without
                                                      moving the VM: run it again)
    failed  --retry--> pending                       (a later apply tries again)

``done`` is never left: a done step stays done. What a step's record says is
only half the truth, since the world changes between runs; so before a step
runs, :func:`decide` weighs its record, its job as the agent reports it now
and where the VM really is, and says what to do: skip it, wait for its job,
mark it done or failed, or run it. :func:`precheck` then re-checks the step's
preconditions (the VM is where the plan said, the destination has the memory,
the networks and the configuration version) just before it runs. No I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from ferry.core import transitions
from ferry.core.cpu_models import CpuFacts, cpu_refusal
from ferry.core.plan.plan_file import Option, Step
from ferry.core.units import format_size
from ferry.core.versions import machine_type
from ferry.errors import InvalidInputError, StorageError

STATE_FORMAT = 1


class StepState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class StepOp(StrEnum):
    START = "start"
    FINISH = "finish"
    FAIL = "fail"
    LOSE = "lose"  # its job ended and the VM did not move: it runs again
    RETRY = "retry"


S = StepState
TRANSITIONS: dict[StepOp, tuple[frozenset[StepState], StepState]] = {
    StepOp.START: (frozenset({S.PENDING}), S.RUNNING),
    StepOp.FINISH: (frozenset({S.RUNNING, S.PENDING, S.FAILED}), S.DONE),
    StepOp.FAIL: (frozenset({S.RUNNING, S.PENDING}), S.FAILED),
    StepOp.LOSE: (frozenset({S.RUNNING}), S.PENDING),
    StepOp.RETRY: (frozenset({S.FAILED}), S.PENDING),
}
# FINISH from pending/failed: a step found already carried out (the VM is on its
# destination) is done without running; FAIL from pending: its precheck refused.


# What each plan option runs as: the jobs of the CLI commands it stands for.
class Action(StrEnum):
    LIVE_MOVE = "live-move"  # ferry vm move --storage MODE
    EXPORT_IMPORT = "export-import"  # ferry vm export, then vm import on the destination
    # In place, as the plan's improvement says: a running VM moves into a fresh QEMU
    # on its host (ferry vm refresh), then, where its configuration version is below
    # the host's level and its state allows that, ferry vm upgrade-version; an off VM
    # gets the upgrade-version alone.
    IN_PLACE = "in-place"
    MOVE_REPLICA = "move-replica"  # ferry replication set VM --replica DESTINATION


_ACTIONS: dict[Option, Action] = {
    Option.LIVE_MIGRATION: Action.LIVE_MOVE,
    Option.EXPORT_IMPORT: Action.EXPORT_IMPORT,
    Option.IN_PLACE: Action.IN_PLACE,
    Option.MOVE_REPLICA: Action.MOVE_REPLICA,
}
# Steps that bring no running VM to their destination (no memory to find there).
# (A refresh holds a second QEMU only for a while: precheck asks for its memory.)
_NO_MEMORY = frozenset({Action.IN_PLACE, Action.MOVE_REPLICA})


def step_key(step: Step) -> str:
    """The name of a step in the state file and the report: ``ORDER:VM``."""
    return f"{step.order}:{step.vm}"


@dataclass(frozen=True)
class StepRecord:
    """What the state file knows about one step."""

    key: str
    state: StepState = StepState.PENDING
    job_id: str | None = None
    job_host: str | None = None
    # Sub-steps of a step made of several jobs (export/import): the last one finished.
    phase: str | None = None
    started: float | None = None
    ended: float | None = None
    error: str | None = None
    result: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "state": self.state.value, "job_id": self.job_id,
                "job_host": self.job_host, "phase": self.phase, "started": self.started,
                "ended": self.ended, "error": self.error, "result": self.result}  # fmt: skip

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> StepRecord:
        return cls(key=str(doc["key"]), state=StepState(doc["state"]), job_id=doc.get("job_id"),
                   job_host=doc.get("job_host"), phase=doc.get("phase"),
                   started=doc.get("started"), ended=doc.get("ended"), error=doc.get("error"),
                   result=dict(doc.get("result") or {}))  # fmt: skip


def advance(record: StepRecord, op: StepOp, **changes: Any) -> StepRecord:
    """The record after ``op`` (StateError when its state does not allow it)."""
    state = transitions.apply(TRANSITIONS, record.state, op, subject=f"plan step {record.key}")
    if op in (StepOp.LOSE, StepOp.RETRY):
        changes = {"job_id": None, "job_host": None, "phase": None, "error": None, **changes}
    return replace(record, state=state, **changes)


@dataclass(frozen=True)
class ApplyState:
    """The state file: the plan it belongs to (its digest) and every step's record."""

    plan_digest: str
    steps: tuple[StepRecord, ...]

    @classmethod
    def fresh(cls, plan_digest: str, keys: Iterable[str]) -> ApplyState:
        return cls(plan_digest, tuple(StepRecord(key) for key in keys))

    def record(self, key: str) -> StepRecord:
        for record in self.steps:
            if record.key == key:
                return record
        raise KeyError(key)

    def put(self, record: StepRecord) -> ApplyState:
        return replace(self, steps=tuple(record if r.key == record.key else r
                                         for r in self.steps))  # fmt: skip

    def count(self, state: StepState) -> int:
        return sum(1 for r in self.steps if r.state is state)

    @property
    def all_done(self) -> bool:
        return all(r.state is StepState.DONE for r in self.steps)

    def to_json(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "plan_digest": self.plan_digest,
                "steps": [r.to_json() for r in self.steps]}  # fmt: skip

    @classmethod
    def load(cls, doc: Mapping[str, Any], plan_digest: str, keys: Iterable[str], *,
             source: str = "apply state") -> ApplyState:  # fmt: skip
        """The state of this plan: ``doc`` if it is this plan's, else a fresh one.

        A state file left by another plan (re-planned under the same name) does
        not count: where the VMs really are decides its steps then. One of this
        plan's that is damaged (a step without its key, an unknown state, steps
        that are not a list) is refused with one line (StorageError).
        """
        keys = list(keys)
        if doc.get("format") != STATE_FORMAT or doc.get("plan_digest") != plan_digest:
            return cls.fresh(plan_digest, keys)
        try:
            steps = doc.get("steps", [])
            if not isinstance(steps, list):
                raise TypeError(f"its steps are a {type(steps).__name__}, not a list")
            known = {r.key: r for r in (StepRecord.from_json(s) for s in steps)}
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            what = f"a step has no {exc}" if isinstance(exc, KeyError) else str(exc)
            raise StorageError(
                f"cannot read {source}: it is damaged ({what}): move it away "
                "to start over (where the VMs are decides then)"
            ) from None
        return cls(plan_digest, tuple(known.get(key, StepRecord(key)) for key in keys))


# -- what the runner sees of the world ------------------------------------------------


@dataclass(frozen=True)
class VmSeen:
    """One VM as its host reports it now."""

    name: str
    host: str
    state: str
    memory: int
    config_version: int
    uuid: str = ""
    busy: str | None = None
    incoming: bool = False  # arriving by live migration; still the source's
    pid: int | None = None  # its QEMU's process id while it runs


@dataclass(frozen=True)
class HostSeen:
    """One host as its agent reports it now (``free_memory``: what new VMs may use)."""

    name: str
    free_memory: int
    functional_level: int
    max_config_version: int
    networks: frozenset[str] | None = None  # None: the host does not report its networks
    cpu: CpuFacts | None = None  # the CPU models it runs (None: not reported)


@dataclass(frozen=True)
class JobSeen:
    id: str
    state: str  # a move's phase or done/failed/cancelled
    error: str | None = None
    result: Mapping[str, Any] = field(default_factory=dict)


JOB_FINAL = frozenset({"done", "failed", "cancelled"})


@dataclass(frozen=True)
class StepPlan:
    """The part of a plan step that apply acts on and re-checks."""

    key: str
    vm: str
    uuid: str
    action: Action
    source: str
    target: str
    storage: str = "auto"  # a live move's --storage
    must_run: bool = False  # the VM must be running (a live option)
    min_level: int = 0  # the destination's functional level must be at least this
    networks: tuple[str, ...] = ()  # the destination must have these
    cpu_model: str | None = None  # and run this CPU model (None: not asked)
    # The plan has the VM running on the destination (it asks for memory there).
    needs_memory: bool = False
    downtime_limit_ms: int | None = None  # a live move's limit (the policy's max-downtime)


def lands_running(step: StepPlan, vm: VmSeen) -> bool:
    """Whether ``vm`` will run on the step's destination, so it needs memory there: it
    runs now (a move keeps it running, an export/import starts it again), or the plan
    says so. An off VM moved or exported and imported lands off and takes none."""
    if step.action in _NO_MEMORY:
        return False
    return step.needs_memory or step.must_run or vm.state not in ("off", "crashed")


def step_plan(step: Step) -> StepPlan:
    """What apply runs for ``step``; one clear line for an option it cannot run."""
    action = _ACTIONS.get(step.option)
    if action is None:
        raise InvalidInputError(
            f"step {step_key(step)} is {step.option}, which plan apply cannot carry out yet "
            "(it runs live migration, export/import, in-place upgrade and replica moves): "
            "run that step by hand, or re-plan without it"
        )
    if action is Action.LIVE_MOVE and step.destination_cluster is not None:
        # A move that keeps the VM clustered hands ownership over between
        # clusters; that command (vm move --to-cluster) is not built yet.
        raise InvalidInputError(
            f"step {step_key(step)} moves VM {step.vm} into cluster "
            f"{step.destination_cluster}, which plan apply cannot carry out yet: take it out "
            "of its cluster ('ferry cluster vm remove'), move it, then add it "
            "('ferry cluster vm add'), or re-plan to hosts"
        )
    pre = step.preconditions
    return StepPlan(key=step_key(step), vm=step.vm, uuid=pre.vm_uuid, action=action,
                    source=step.source, target=step.destination,
                    storage=step.storage or "auto",
                    must_run=pre.must_be_running or action is Action.LIVE_MOVE,
                    min_level=pre.destination_functional_level,
                    networks=tuple(pre.networks), cpu_model=pre.cpu_model,
                    needs_memory=pre.destination_free_memory > 0,
                    downtime_limit_ms=step.downtime_limit_ms)  # fmt: skip


def _mine(step: StepPlan, vms: Iterable[VmSeen]) -> list[VmSeen]:
    """The copies that are this step's VM: its replica copies for a replica move, else
    the others (matched by uuid, or by name when the uuid is not known)."""
    replica = step.action is Action.MOVE_REPLICA
    return [vm for vm in vms if (vm.uuid == step.uuid if step.uuid and vm.uuid
                                 else vm.name == step.vm)
            and (vm.state == "replica") == replica]  # fmt: skip


def locate(step: StepPlan, vms: Iterable[VmSeen]) -> VmSeen | None:
    """The step's VM where it counts (not a copy still arriving); None if none or several."""
    own = [vm for vm in _mine(step, vms) if not vm.incoming]
    return own[0] if len(own) == 1 else None


def upgrade_allowed(state: str, current: int, level: int) -> bool:
    """Whether ``vm upgrade-version`` takes a VM in ``state`` from ``current`` to ``level``:
    a live VM only when its machine type stays (else it needs a restart first)."""
    if current >= level:
        return False
    live = state not in ("off", "crashed")
    return not live or machine_type(current) == machine_type(level)


def refreshed(vm: VmSeen, record: StepRecord | None) -> bool:
    """Whether the in-place step's move into a fresh QEMU already happened: the record
    says so, or the VM's QEMU is not the one the step found (its pid, recorded before
    the refresh was asked for, changed: a refresh, or a restart, made a new process,
    which runs the host's current binary)."""
    if record is None:
        return False
    if record.result.get("refreshed"):
        return True
    before = record.result.get("from_pid")
    return before is not None and vm.pid is not None and vm.pid != before


def in_place_work(step: StepPlan, vm: VmSeen, record: StepRecord | None) -> tuple[bool, bool]:
    """What the in-place step has still to do to ``vm``: (refresh it, upgrade its version)."""
    refresh = vm.state == "running" and not refreshed(vm, record)
    return refresh, upgrade_allowed(vm.state, vm.config_version, step.min_level)


def arrived(step: StepPlan, vms: Iterable[VmSeen], record: StepRecord | None = None) -> bool:
    """True when the step's effect is already there: the VM on its destination, settled
    (in place: in a fresh QEMU if it runs, at the host's version where its state allows)."""
    own = _mine(step, vms)
    if step.action is Action.IN_PLACE:
        here = [vm for vm in own if vm.host == step.target and not vm.incoming
                and vm.state not in ("migrating", "starting")]  # fmt: skip
        return len(here) == 1 and not any(in_place_work(step, here[0], record))
    if any(vm.host == step.source for vm in own):
        return False  # still there (a copy on the destination is not yet the VM)
    settled = [vm for vm in own if vm.host == step.target and not vm.incoming
               and vm.state not in ("migrating", "starting")]  # fmt: skip
    return bool(settled) and (not step.must_run or settled[0].state == "running")


class Decision(StrEnum):
    SKIP = "skip"  # done before: stays done
    AWAIT = "await"  # its job still runs: follow it
    MARK_DONE = "mark-done"
    MARK_FAILED = "mark-failed"
    RUN = "run"


def decide(
    step: StepPlan, record: StepRecord, job: JobSeen | None, vms: Iterable[VmSeen]
) -> tuple[Decision, str]:
    """What to do with ``step`` now, and why (one phrase for the report).

    A done step is skipped. A running step's job, found again by its id, is
    followed while it runs and decides when it ended; a job that is gone, or
    that ended without carrying the step out, leaves it to where the VM is:
    on its destination the step is done, on its source it runs (again). A job
    that failed while no apply watched fails the step only when its VM is no
    longer where it was (a move's failure leaves the VM on its source).
    """
    vms = list(vms)
    if record.state is StepState.DONE:
        return Decision.SKIP, "done before"
    several_jobs = step.action is Action.EXPORT_IMPORT  # what is left follows its job
    if record.state is StepState.RUNNING and job is not None:
        if job.state not in JOB_FINAL:
            return Decision.AWAIT, f"its job {job.id} still runs ({job.state})"
        if job.state == "done" and not several_jobs:
            return Decision.MARK_DONE, f"its job {job.id} finished"
        if job.state == "failed" and not arrived(step, vms, record):
            home = locate(step, vms)
            if home is None or home.host != step.source:
                return Decision.MARK_FAILED, f"its job {job.id} failed: {job.error}"
            # Failed while no apply watched (an agent restart undoes a move), and the
            # VM is where it was: running it again is what a new apply of it does.
    if arrived(step, vms, record):
        if step.action is Action.IN_PLACE:
            return Decision.MARK_DONE, f"VM {step.vm} is upgraded in place on {step.target}"
        return Decision.MARK_DONE, f"VM {step.vm} is already on {step.target}"
    if (record.state is StepState.RUNNING and not several_jobs
            and locate(step, vms) is None and _mine(step, vms)):  # fmt: skip
        hosts = ", ".join(sorted({vm.host for vm in _mine(step, vms)}))
        return (Decision.MARK_FAILED,
                f"VM {step.vm} is half way (copies on {hosts}): look with 'ferry vm list' "
                "and 'ferry job list', then apply again")  # fmt: skip
    return Decision.RUN, "to run"


def precheck(step: StepPlan, vms: Iterable[VmSeen], target: HostSeen | None) -> str | None:
    """Why ``step`` cannot run now (one line: what and what to do), or None."""
    vms = list(vms)
    vm = locate(step, vms)
    if vm is None:
        copies = sorted({v.host for v in _mine(step, vms)})
        if copies:
            return (f"VM {step.vm} is on several hosts ({', '.join(copies)}): look with "
                    "'ferry vm list' and 'ferry job list', then apply again")  # fmt: skip
        return f"VM {step.vm} is on no host now (the plan had it on {step.source}): re-plan"
    if vm.host != step.source:
        return (f"VM {step.vm} is on {vm.host}, not on {step.source} where the plan had it: "
                "re-plan")  # fmt: skip
    if target is None:
        return f"host {step.target} cannot be reached: bring its agent up, then apply again"
    if step.must_run and vm.state != "running":
        return (f"VM {step.vm} is {vm.state}, and a live migration needs it running: "
                "start it or re-plan")  # fmt: skip
    if vm.busy:
        return f"VM {step.vm} is busy ({vm.busy}): wait for that to end, then apply again"
    if step.min_level > target.functional_level:
        return (f"{step.target} runs functional level {target.functional_level}, the step needs "
                f"{step.min_level}: upgrade {step.target} first")  # fmt: skip
    if step.action is Action.IN_PLACE:
        if vm.state == "running" and vm.memory > target.free_memory:
            # Its fresh QEMU takes the VM's memory until the old one quits.
            return capacity_refusal(step.vm, vm.memory, target)
        return None
    if lands_running(step, vm) and vm.memory > target.free_memory:
        return capacity_refusal(step.vm, vm.memory, target)
    if vm.config_version > target.max_config_version:
        return (f"{step.target} runs configuration versions up to {target.max_config_version}, "
                f"VM {step.vm} has {vm.config_version}: upgrade {step.target} first")  # fmt: skip
    if step.cpu_model is not None and target.cpu is not None:
        refusal = cpu_refusal(step.cpu_model, target.cpu)
        if refusal is not None:
            return f"{refusal}: VM {step.vm} uses it; re-plan to another destination"
    if target.networks is not None:
        missing = sorted(set(step.networks) - target.networks)
        if missing:
            return (f"{step.target} lacks network {', '.join(missing)} that VM {step.vm} uses: "
                    "add it ('ferry host network add') or re-plan")  # fmt: skip
    return None


def capacity_refusal(vm: str, memory: int, target: HostSeen) -> str:
    return (f"{target.name} lacks the capacity for VM {vm}: it needs {format_size(memory)} of "
            f"memory and {target.name} has {format_size(max(target.free_memory, 0))} free; "
            "free memory there or re-plan to another destination")  # fmt: skip


def capacity_shortfall(
    steps: Iterable[StepPlan], vms: Iterable[VmSeen], hosts: Mapping[str, HostSeen]
) -> str | None:
    """The first step, in order, whose destination runs out of memory; None if none does.

    The plan is checked as a whole before anything starts: each VM that lands
    takes its memory on its destination and gives it back on its source.
    """
    vms = list(vms)
    free = {name: host.free_memory for name, host in hosts.items()}
    for step in steps:
        vm = locate(step, vms)
        if vm is None or not lands_running(step, vm) or step.target not in free:
            continue
        if vm.memory > free[step.target]:
            left = replace(hosts[step.target], free_memory=free[step.target])
            return capacity_refusal(step.vm, vm.memory, left)
        free[step.target] -= vm.memory
        if step.source in free:
            free[step.source] += vm.memory
    return None
