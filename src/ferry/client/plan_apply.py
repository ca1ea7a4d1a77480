"""``ferry plan apply``'s runner: carries a plan's steps out as the jobs the CLI commands run.

Each step goes through the same agent calls as its CLI command (``vm move``
with the step's storage mode; ``vm export`` then ``vm import`` on the
destination; in place, ``vm refresh`` for a running VM (a fresh QEMU on its
host) then ``vm upgrade-version`` where its state allows). The step states live in a state file
beside the plan (``PLAN.json.state``), written before and after every job,
so an apply stopped anywhere (Ctrl-C, a killed client, an agent restart)
is carried on by the next one: done steps stay done, a step whose job was
running is found again by the job's id, and the rest is judged from where
the VMs really are (:func:`ferry.core.plan.apply_state.decide`).

Before anything starts, the whole plan is checked: its digest (an edited
file is refused by :func:`ferry.core.plan.plan_file.loads`), that the world
is still the one it was made from (for the steps still to run) and that
every destination has the memory for what lands on it. Then each step's
preconditions are checked again just before it runs.

The runner prints nothing: what it does goes to an :class:`ApplyObserver`
(the CLI draws the bars or prints JSON events).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ferry.client.fleet import Fleet
from ferry.core.cpu_models import CpuFacts, CpuModel
from ferry.core.plan import apply_state as st
from ferry.core.plan.apply_state import Action, ApplyState, Decision, StepOp, StepPlan, StepState
from ferry.core.plan.plan_file import (
    DiskFacts,
    HostFacts,
    Inventory,
    Plan,
    VmFacts,
    inventory_changes,
    loads,
)
from ferry.errors import (
    ConflictError,
    ConnectionFailedError,
    FerryError,
    InvalidInputError,
    NotFoundError,
    StorageError,
)

log = logging.getLogger(__name__)

POLL_S = 0.5
UNREACHABLE_GRACE_S = 120.0  # an agent restarting mid-step: keep asking this long


class ApplyObserver(Protocol):
    """What the runner tells whoever shows it (CLI bars, JSON events)."""

    def started(self, steps: list[StepPlan], done: int) -> None: ...
    def step_started(self, step: StepPlan, what: str) -> None: ...
    def job(self, step: StepPlan, job: dict[str, Any]) -> None: ...
    def step_ended(self, step: StepPlan, record: st.StepRecord, why: str) -> None: ...


@dataclass
class Report:
    """What an apply did: every step's record, in plan order, and the first failure."""

    steps: list[StepPlan]
    state: ApplyState
    failure: str | None = None
    already_done: bool = False  # nothing was left to do when it started
    todo: list[StepPlan] = field(default_factory=list)  # a dry run: what would run

    def keys(self, *states: StepState) -> list[str]:
        return [r.key for r in self.state.steps if r.state in states]

    def to_json(self) -> dict[str, Any]:
        return {"result": "failed" if self.failure else "ok", "error": self.failure,
                "done": self.keys(StepState.DONE), "failed": self.keys(StepState.FAILED),
                "left": self.keys(StepState.PENDING, StepState.RUNNING),
                "already_done": self.already_done,
                "steps": [r.to_json() for r in self.state.steps]}  # fmt: skip


@dataclass
class World:
    """What the agents report now: each VM copy, each host, and who did not answer."""

    vms: list[st.VmSeen]
    views: dict[tuple[str, str], dict[str, Any]]  # (host, vm) -> VmView
    hosts: dict[str, st.HostSeen]
    host_views: dict[str, dict[str, Any]]
    unreachable: dict[str, str] = field(default_factory=dict)


def state_path(plan_path: Path) -> Path:
    return plan_path.with_name(plan_path.name + ".state")


def read_plan(path: Path) -> Plan:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise NotFoundError(f"cannot read plan file {path}: {exc.strerror}") from None
    return loads(text, source=f"plan file {path}")


def replan_command(plan: Plan, path: Path) -> str:
    """The exact ``ferry plan create`` that makes this plan again from today's world."""
    words = ["ferry", "plan", "create", "--from", *plan.sources, "--to", *plan.destinations]
    if plan.policy is not None:
        words += ["--policy", "POLICY"]
    return shlex.join([*words, "-o", str(path)]).replace("POLICY", "<your policy file>")


class PlanApply:
    """Carries out the plan at ``path`` against the hosts of ``fleet``."""

    def __init__(self, fleet: Fleet, path: Path, observer: ApplyObserver, *,
                 export_dir: str | None = None) -> None:  # fmt: skip
        self.fleet = fleet
        self.path = path
        self.observer = observer
        self.export_dir = export_dir
        self.plan = read_plan(path)
        self.steps = [st.step_plan(step) for step in self.plan.steps]
        self.state_file = state_path(path)
        self.state = ApplyState.load(self._read_state(), self.plan.digest,
                                     [s.key for s in self.steps],
                                     source=f"apply state {self.state_file}")  # fmt: skip
        self._outage: set[str] = set()  # steps whose job's agent stopped answering
        self._retried: set[str] = set()

    # -- the state file --------------------------------------------------------------

    def _read_state(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StorageError(
                f"cannot read apply state {self.state_file}: {exc}: move it away "
                "to start over (where the VMs are decides then)"
            ) from None
        return doc if isinstance(doc, dict) else {}

    def _put(self, record: st.StepRecord) -> st.StepRecord:
        """Record one step's new state, durably (write, fsync, rename)."""
        self.state = self.state.put(record)
        partial = self.state_file.with_name(self.state_file.name + ".partial")
        try:
            with partial.open("w") as out:
                json.dump(self.state.to_json(), out, indent=1)
                out.flush()
                os.fsync(out.fileno())
            partial.replace(self.state_file)
        except OSError as exc:
            raise StorageError(f"cannot write apply state {self.state_file}: {exc.strerror}",
                               path=str(self.state_file)) from None  # fmt: skip
        return record

    # -- the world ---------------------------------------------------------------------

    def _hosts(self) -> list[str]:
        names = {h.name for h in self.plan.inventory.hosts}
        names |= {s.source for s in self.steps} | {s.target for s in self.steps}
        return sorted(n for n in names if n in self.fleet.settings.hosts)

    async def world(self) -> World:
        names = self._hosts()
        hosts = await asyncio.gather(*(self._ask(n, "/v1/host") for n in names))
        vms = await asyncio.gather(*(self._ask(n, "/v1/vms") for n in names))
        world = World([], {}, {}, {})
        for name, host, views in zip(names, hosts, vms, strict=True):
            if isinstance(host, FerryError) or isinstance(views, FerryError):
                world.unreachable[name] = str(host if isinstance(host, FerryError) else views)
                continue
            world.host_views[name] = host
            for view in views:
                world.views[(name, view["name"])] = view
                world.vms.append(st.VmSeen(
                    name=view["name"], host=name, state=view["state"], memory=view["memory"],
                    config_version=view["config_version"], uuid=view["uuid"],
                    busy=view.get("busy"), incoming=bool(view.get("incoming")),
                    pid=view.get("pid")))  # fmt: skip
            running = sum(v["memory"] for v in views if v["state"] in _USES_MEMORY)
            free = host.get("free_memory", host["memory"] - running)
            nets = host.get("networks")
            world.hosts[name] = st.HostSeen(
                name, free_memory=int(free), functional_level=host["functional_level"],
                max_config_version=host["supported_config_versions"][1],
                networks=None if nets is None else frozenset(
                    n["name"] if isinstance(n, dict) else str(n) for n in nets),
                cpu=CpuFacts(host=name, models=tuple(
                    CpuModel.model_validate(m) for m in host.get("cpu_models") or ())))  # fmt: skip
        return world

    async def _ask(self, host: str, path: str) -> Any:
        try:
            return await self.fleet.client(host).get(path)
        except FerryError as exc:
            return exc

    # -- checks before anything starts -------------------------------------------------

    def _now_inventory(self, world: World) -> Inventory:
        """Today's facts in the plan's terms (what the stale check compares; no probes)."""
        kinds = {vm.uuid: vm for vm in self.plan.inventory.vms}
        vms = []
        for (host, _), view in world.views.items():
            then = kinds.get(view["uuid"])
            vms.append(VmFacts(
                name=view["name"], uuid=view["uuid"], host=host, state=view["state"],
                memory=view["memory"], cpus=view.get("cpus", 1),
                config_version=view["config_version"],
                disks=[DiskFacts(path=d["path"], size=d["size"]) for d in view.get("disks", [])],
                # The storage kind is the planner's reading of the disks' paths; apply
                # compares the sizes and takes the kind as planned.
                **({"storage": then.storage} if then is not None else {})))  # fmt: skip
        hosts = [HostFacts(name=n, url=h.get("url", ""), functional_level=h["functional_level"],
                           memory=h["memory"], free_memory=world.hosts[n].free_memory)
                 for n, h in world.host_views.items()]  # fmt: skip
        hosts += [h for h in self.plan.inventory.hosts if h.name in world.unreachable]
        return Inventory(taken="now", hosts=hosts, vms=vms)

    def check(self, world: World, todo: list[StepPlan]) -> None:
        """Refuse, changing nothing, a plan whose world has moved on for ``todo``."""
        for host in sorted({s.source for s in todo} | {s.target for s in todo}):
            if host in world.unreachable:
                raise ConnectionFailedError(
                    f"host {host} of the plan cannot be reached ({world.unreachable[host]}): "
                    "bring its agent up, then apply again")  # fmt: skip
        # A step under way changed its VM itself; the others must find the world as planned.
        keys = {s.key for s in todo if self.state.record(s.key).state is not StepState.RUNNING}
        pending = self.plan.model_copy(update={
            "steps": [s for s in self.plan.steps if st.step_key(s) in keys]})  # fmt: skip
        changes = inventory_changes(pending, self._now_inventory(world))
        if changes:
            raise InvalidInputError(
                f"plan {self.path} is stale, the hosts changed since it was made: "
                f"{'; '.join(changes)}; nothing was changed: re-plan with "
                f"{replan_command(self.plan, self.path)}")  # fmt: skip
        short = st.capacity_shortfall(todo, world.vms, world.hosts)
        if short is not None:
            raise ConflictError(f"plan {self.path} cannot run: {short}; nothing was changed")
        if any(s.action is Action.EXPORT_IMPORT for s in todo) and not self.export_dir:
            vms = ", ".join(s.vm for s in todo if s.action is Action.EXPORT_IMPORT)
            raise InvalidInputError(
                f"the plan exports and imports {vms}: pass --export-dir DIR, a folder both "
                "hosts see inside their image dirs; nothing was changed")  # fmt: skip

    # -- the run -------------------------------------------------------------------------

    async def run(self, *, dry_run: bool = False) -> Report:
        world = await self.world()
        todo: list[StepPlan] = []
        found: list[tuple[StepPlan, str]] = []
        for step in self.steps:
            record = self.state.record(step.key)
            job = await self._job(record) if record.state is StepState.RUNNING else None
            decision, why = st.decide(step, record, job, world.vms)
            if decision is Decision.MARK_DONE:
                found.append((step, why))
            elif decision is not Decision.SKIP:
                todo.append(step)
        if not todo:
            if not dry_run:
                for step, why in found:
                    self._finish_found(step, why)
            return Report(self.steps, self.state, already_done=True)
        self.check(world, todo)
        if dry_run:
            return Report(self.steps, self.state, todo=todo)
        self.observer.started(self.steps, len(self.steps) - len(todo))
        for step in self.steps:
            failure = await self._carry_out(step)
            if failure is not None:
                return Report(self.steps, self.state, failure=failure)
        return Report(self.steps, self.state)

    def _finish_found(self, step: StepPlan, why: str) -> None:
        record = self.state.record(step.key)
        if record.state is not StepState.DONE:
            self._put(st.advance(record, StepOp.FINISH, ended=time.time(),
                                 result={**record.result, "found_done": why}))  # fmt: skip

    async def _job(self, record: st.StepRecord) -> st.JobSeen | None:
        if record.job_id is None or record.job_host is None:
            return None
        try:
            job = await self.fleet.client(record.job_host).get(f"/v1/jobs/{record.job_id}")
        except NotFoundError:
            return None
        return _seen(job)

    async def _carry_out(self, step: StepPlan) -> str | None:
        """Run one step to its end; the failure's line, or None."""
        while True:
            try:
                world = await self._world_for(step)
            except ConnectionFailedError as exc:
                return self._fail(step, str(exc))
            record = self.state.record(step.key)
            job = await self._job(record) if record.state is StepState.RUNNING else None
            decision, why = st.decide(step, record, job, world.vms)
            if decision is Decision.SKIP:
                return None
            if decision is Decision.MARK_DONE:
                result = dict(record.result)
                if job is not None:
                    result.update(job.result)
                self._put(st.advance(record, StepOp.FINISH, ended=time.time(), result=result))
                self.observer.step_ended(step, self.state.record(step.key), why)
                return None
            if decision is Decision.MARK_FAILED:
                return self._fail(step, why)
            if decision is Decision.AWAIT:
                assert job is not None and record.job_host is not None
                self.observer.step_started(step, f"waiting for its job {job.id}")
                await self._follow(step, record.job_host, job.id)
                continue
            # An export/import under way goes on from where it is (each of its parts
            # looks first); any other step starts again, checked as a new one.
            going_on = record.state is StepState.RUNNING and step.action is Action.EXPORT_IMPORT
            if record.state is StepState.RUNNING and not going_on:
                record = self._put(st.advance(record, StepOp.LOSE))
            elif record.state is StepState.FAILED:
                record = self._put(st.advance(record, StepOp.RETRY))
            if not going_on:
                refusal = st.precheck(step, world.vms, world.hosts.get(step.target))
                if refusal is not None:
                    return self._fail(step, refusal)
            try:
                finished = await self._run_action(step, world)
            except FerryError as exc:
                if step.key in self._outage and step.key not in self._retried:
                    # Its agent went away during the job (a restart undoes a move, the
                    # VM stays): once per step, the world decides again.
                    log.info("step %s: %s after its agent was away; once more", step.key, exc)
                    self._retried.add(step.key)
                    record = self.state.record(step.key)
                    if record.state is StepState.RUNNING:
                        self._put(st.advance(record, StepOp.LOSE))
                    continue
                return self._fail(step, str(exc))
            if finished:  # a call that did the whole step (no job to judge it by)
                record = self.state.record(step.key)
                self._put(st.advance(record, StepOp.FINISH, ended=time.time()))
                self.observer.step_ended(step, self.state.record(step.key), "done")
                return None

    async def _world_for(self, step: StepPlan) -> World:
        """The world once the step's hosts answer (an agent restarting is waited for)."""
        since = time.monotonic()
        while True:
            world = await self.world()
            away = [h for h in (step.source, step.target) if h in world.unreachable]
            if not away:
                return world
            if time.monotonic() - since > UNREACHABLE_GRACE_S:
                raise ConnectionFailedError(
                    f"host {away[0]} cannot be reached ({world.unreachable[away[0]]}): bring "
                    "its agent up, then apply again")  # fmt: skip
            self.observer.step_started(step, f"waiting for host {away[0]} to answer")
            await asyncio.sleep(2 * POLL_S)

    def _fail(self, step: StepPlan, why: str) -> str:
        record = self.state.record(step.key)
        self._put(st.advance(record, StepOp.FAIL, ended=time.time(), error=why))
        self.observer.step_ended(step, self.state.record(step.key), why)
        return f"step {step.key} ({step.vm}) failed: {why}"

    async def _start_job(self, step: StepPlan, host: str, path: str, body: dict[str, Any],
                         phase: str) -> str:  # fmt: skip
        job = await self.fleet.client(host).post(path, body)
        record = self.state.record(step.key)
        changes: dict[str, Any] = {"job_id": job["id"], "job_host": host, "phase": phase}
        if record.state is StepState.PENDING:
            self._put(st.advance(record, StepOp.START, started=time.time(), **changes))
        else:
            self._put(_with(record, **changes))
        self.observer.job(step, job)
        return str(job["id"])

    async def _run_action(self, step: StepPlan, world: World) -> bool:
        """Start (and follow) the step's work; True when it is all done already."""
        if step.action is Action.LIVE_MOVE:
            self.observer.step_started(step, f"live migration to {step.target} "
                                             f"({step.storage} storage)")  # fmt: skip
            job_id = await self._start_job(step, step.source, f"/v1/vms/{step.vm}/move",
                                           self.move_body(step), "move")  # fmt: skip
            await self._follow(step, step.source, job_id)
        elif step.action is Action.IN_PLACE:
            await self._in_place(step, world)
            return True
        elif step.action is Action.MOVE_REPLICA:
            primary = next((vm.host for vm in world.vms if vm.uuid == step.uuid
                            and vm.state != "replica" and not vm.incoming), None)  # fmt: skip
            if primary is None:
                raise FerryError(f"the primary of VM {step.vm} is on no reachable host: bring "
                                 "it up, then apply again")  # fmt: skip
            self.observer.step_started(step, f"moving its replica to {step.target}")
            record = self.state.record(step.key)
            self._put(st.advance(record, StepOp.START, started=time.time(), phase="replica"))
            url = self.fleet.settings.host(step.target).url
            await self.fleet.client(primary).call("PATCH", f"/v1/vms/{step.vm}/replication",
                                                  body={"replica": step.target,
                                                        "replica_url": url})  # fmt: skip
            return True
        else:
            await self._export_import(step, world)
        return False

    def move_body(self, step: StepPlan) -> dict[str, Any]:
        """The ``vm move`` request of a live-move step (with the plan's downtime limit)."""
        url = self.fleet.settings.host(step.target).url
        body: dict[str, Any] = {"to": step.target, "to_url": url, "storage": step.storage}
        if step.downtime_limit_ms is not None:
            body["downtime_limit_ms"] = step.downtime_limit_ms
        return body

    async def _in_place(self, step: StepPlan, world: World) -> None:
        """A running VM into a fresh QEMU on its host, then its version up where allowed.

        The pid the step found is recorded before the refresh is asked for, so a later
        apply knows a refresh that happened while nobody watched (a new pid).
        """
        client = self.fleet.client(step.source)
        vm = st.locate(step, world.vms)
        assert vm is not None  # the precheck found it
        record = self.state.record(step.key)
        refresh, upgrade = st.in_place_work(step, vm, record)
        result = dict(record.result)
        if refresh and "from_pid" not in result:
            result["from_pid"] = vm.pid
        record = self._put(st.advance(record, StepOp.START, started=time.time(),
                                      phase="refresh" if refresh else "upgrade-version",
                                      result=result))  # fmt: skip
        if refresh:
            self.observer.step_started(step, f"moving it into a fresh QEMU on {step.source}")
            done = await client.post(f"/v1/vms/{step.vm}/refresh")
            result = {**record.result, "refreshed": True, "pid": done.get("pid"),
                      "old_pid": done.get("old_pid"), "downtime_ms": done.get("downtime_ms"),
                      "total_s": done.get("total_s")}  # fmt: skip
            record = self._put(_with(record, phase="upgrade-version", result=result))
        if upgrade:
            self.observer.step_started(step, "raising its configuration version")
            view = await client.post(f"/v1/vms/{step.vm}/upgrade-version")
            result = {**record.result, "config_version": view.get("config_version")}
        elif vm.config_version < step.min_level:
            result = {**record.result, "config_version": vm.config_version,
                      "note": f"configuration version {vm.config_version} stays: raising it "
                              "changes the machine type, which needs a restart (stop it, "
                              "then ferry vm upgrade-version)"}  # fmt: skip
        self._put(_with(record, result=result))

    async def _export_import(self, step: StepPlan, world: World) -> None:
        """Stop (if it runs), export, import on the destination, remove the source, start."""
        assert self.export_dir is not None
        source = self.fleet.client(step.source)
        folder = f"{self.export_dir.rstrip('/')}/{step.vm}-{self.plan.digest[7:19]}"
        record = self.state.record(step.key)
        view = world.views.get((step.source, step.vm))
        if record.state is StepState.PENDING:
            record = self._put(st.advance(record, StepOp.START, started=time.time(), phase="stop",
                                          result={**record.result, "folder": folder}))  # fmt: skip
        if view is not None and view["state"] not in ("off", "crashed"):
            self.observer.step_started(step, "stopping it for export/import")
            await source.post(f"/v1/vms/{step.vm}/stop", {"timeout_s": 60})
            record = self._put(_with(record, result={**record.result, "stopped": True}))
        on_target = world.views.get((step.target, step.vm))
        if on_target is None or on_target["uuid"] != step.uuid:
            if not record.result.get("exported"):
                self.observer.step_started(step, f"exporting to {folder}")
                try:
                    job_id = await self._start_job(step, step.source,
                                                   f"/v1/vms/{step.vm}/export",
                                                   {"to": folder}, "export")  # fmt: skip
                    await self._follow(step, step.source, job_id)
                except ConflictError:
                    # The folder (named for this VM and this plan) was sealed by an export
                    # whose end was not recorded; the import checks its manifest.
                    log.info("export folder %s exists; importing it", folder)
                record = self.state.record(step.key)
                record = self._put(_with(record, result={**record.result, "exported": True}))
            self.observer.step_started(step, f"importing on {step.target}")
            body = {"folder": folder, "mode": "copy"}
            job_id = await self._start_job(step, step.target, "/v1/imports", body, "import")
            await self._follow(step, step.target, job_id)
            return  # the next round sees the imported copy and carries on
        if (step.source, step.vm) in world.views:
            self.observer.step_started(step, f"removing it from {step.source}")
            await source.delete(f"/v1/vms/{step.vm}", force="0")
        if self.state.record(step.key).result.get("stopped") and on_target["state"] == "off":
            self.observer.step_started(step, f"starting it on {step.target}")
            await self.fleet.client(step.target).post(f"/v1/vms/{step.vm}/start")

    async def _follow(self, step: StepPlan, host: str, job_id: str) -> dict[str, Any]:
        """Poll the job until it ends; an agent that restarts is waited for a while.

        Ctrl-C cancels the job as ``vm move`` does (the VM stays where it was); the
        step stays ``running`` with the job's id, and the next apply judges it.
        """
        client = self.fleet.client(host)
        lost_since: float | None = None
        try:
            while True:
                try:
                    job: dict[str, Any] = await client.get(f"/v1/jobs/{job_id}")
                    lost_since = None
                except ConnectionFailedError:
                    self._outage.add(step.key)
                    lost_since = lost_since or time.monotonic()
                    if time.monotonic() - lost_since > UNREACHABLE_GRACE_S:
                        raise
                    await asyncio.sleep(POLL_S)
                    continue
                self.observer.job(step, job)
                if job["state"] in st.JOB_FINAL:
                    if job["state"] != "done":
                        raise FerryError(f"its job {job_id} on {host} {job['state']}: "
                                         f"{job.get('error')}")  # fmt: skip
                    return job
                await asyncio.sleep(POLL_S)
        except (KeyboardInterrupt, asyncio.CancelledError):
            # Ended meanwhile, or its agent is away: the next apply judges it.
            with contextlib.suppress(FerryError):
                await asyncio.shield(client.post(f"/v1/jobs/{job_id}/cancel"))
            raise


_USES_MEMORY = frozenset({"running", "paused", "starting", "migrating", "stopping"})


def _seen(job: dict[str, Any]) -> st.JobSeen:
    return st.JobSeen(id=job["id"], state=job["state"], error=job.get("error"),
                      result=job.get("result") or {})  # fmt: skip


def _with(record: st.StepRecord, **changes: Any) -> st.StepRecord:
    from dataclasses import replace

    return replace(record, **changes)


def summary(steps: Iterable[StepPlan]) -> list[str]:
    return [f"{s.key} {s.vm}: {s.action} {s.source} -> {s.target}" for s in steps]
