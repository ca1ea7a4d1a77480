"""``ferry plan apply PLAN.json``: the bars (or JSON events) and the report of an apply.

Registered by :mod:`ferry.cli.plan_cmd` as its ``apply`` command; the work is
done by :class:`ferry.client.plan_apply.PlanApply`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from ferry.cli.output import err, print_json, print_table, say
from ferry.cli.progress import _describe, _fraction
from ferry.cli.vm_cmd import with_fleet
from ferry.errors import FerryError

if TYPE_CHECKING:
    from ferry.client.fleet import Fleet
    from ferry.client.plan_apply import Report
    from ferry.core.plan.apply_state import StepPlan, StepRecord


class JsonEvents:
    """One JSON event a line: each step's start and end, each change of its job."""

    def __init__(self) -> None:
        self._last: dict[str, Any] = {}

    def started(self, steps: list[StepPlan], done: int) -> None:
        print_json({"event": "apply", "steps": len(steps), "done": done})

    def step_started(self, step: StepPlan, what: str) -> None:
        print_json({"event": "step", "step": step.key, "vm": step.vm, "state": "running",
                    "doing": what})  # fmt: skip

    def job(self, step: StepPlan, job: dict[str, Any]) -> None:
        keys = ("id", "kind", "state", "phase", "progress")
        event = {"event": "progress", "step": step.key, **{k: job.get(k) for k in keys}}
        if event != self._last:
            print_json(event)
            self._last = event

    def step_ended(self, step: StepPlan, record: StepRecord, why: str) -> None:
        print_json({"event": "step", "step": step.key, "vm": step.vm,
                    "state": record.state.value, "why": why})  # fmt: skip


class Bars:
    """An overall bar (steps done of all) and the running step's own bar."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.fields[label]}"), BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
            TextColumn("{task.description}"), console=err, transient=True,
        )  # fmt: skip
        self._plan: TaskID | None = None
        self._step: TaskID | None = None
        self._done = 0

    def started(self, steps: list[StepPlan], done: int) -> None:
        self._done = done
        self.progress.start()
        self._plan = self.progress.add_task(f"{done}/{len(steps)} steps done", label="plan",
                                            total=len(steps), completed=done)  # fmt: skip

    def step_started(self, step: StepPlan, what: str) -> None:
        if self._step is None:
            self._step = self.progress.add_task(what, label=f"step {step.key}", total=1.0)
        else:
            self.progress.update(self._step, description=what, label=f"step {step.key}",
                                 completed=0, total=1.0)  # fmt: skip

    def job(self, step: StepPlan, job: dict[str, Any]) -> None:
        if self._step is None:
            self.step_started(step, job.get("kind", "job"))
        assert self._step is not None
        done, total = _fraction(job)
        self.progress.update(self._step, completed=done, total=total, description=_describe(job))

    def step_ended(self, step: StepPlan, record: StepRecord, why: str) -> None:
        if record.state.value == "done":
            self._done += 1
        if self._plan is not None:
            total = self.progress.tasks[self._plan].total or 1
            self.progress.update(self._plan, completed=self._done,
                                 description=f"{self._done}/{total:.0f} steps done")  # fmt: skip
        say(f"step {step.key} {step.vm}: {record.state.value} ({why})")

    def stop(self) -> None:
        if self._plan is not None:  # started: a bar that never showed leaves no line
            self.progress.stop()


def _print_report(report: Report, path: Path) -> None:
    rows = []
    for step, record in zip(report.steps, report.state.steps, strict=True):
        result = record.result
        took = ""
        if record.started and record.ended:
            took = f"{record.ended - record.started:.1f}"
        downtime = result.get("downtime_ms")
        rows.append([step.key, step.vm, step.action.value, f"{step.source} -> {step.target}",
                     record.state.value, took or None,
                     None if downtime is None else f"{downtime} ms",
                     record.error])  # fmt: skip
    print_table(["STEP", "VM", "ACTION", "MOVE", "STATE", "TOOK_S", "DOWNTIME", "ERROR"], rows)
    doc = report.to_json()
    say("; ".join(f"{what}: {', '.join(doc[what]) or 'none'}"
                  for what in ("done", "failed", "left")))  # fmt: skip
    if report.failure:
        say(f"fix what failed, then carry on with: ferry plan apply {path}")


def apply(
    plan: Path = typer.Argument(..., help="The plan file (from ferry plan create)."),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Check the plan against the hosts and say what would run.",
    ),
    export_dir: str | None = typer.Option(
        None,
        "--export-dir",
        metavar="DIR",
        help="For export/import steps: a folder both hosts see, inside their image dirs.",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON event a line and the report as the last line."
    ),
) -> None:
    """Carry a plan out, step by step; run it again to resume (done steps stay done)."""
    from ferry.client.plan_apply import PlanApply

    observer: JsonEvents | Bars = JsonEvents() if as_json else Bars()

    async def run(fleet: Fleet) -> Report:
        runner = PlanApply(fleet, plan, observer, export_dir=export_dir)
        try:
            return await runner.run(dry_run=dry_run)
        finally:
            if isinstance(observer, Bars):
                observer.stop()

    report = with_fleet(run)
    if as_json:
        print_json({**report.to_json(), "dry_run": dry_run})
    elif report.already_done:
        say(f"every step of plan {plan} is done already ({len(report.steps)} steps): "
            "nothing to do")  # fmt: skip
    elif dry_run:
        say(f"plan {plan} checks out against the hosts; apply would run:")
        print_table(["STEP", "VM", "ACTION", "FROM", "TO", "STORAGE"],
                    [[s.key, s.vm, s.action.value, s.source, s.target,
                      s.storage if s.action.value == "live-move" else None]
                     for s in report.todo])  # fmt: skip
    else:
        _print_report(report, plan)
    if report.failure:
        raise FerryError(report.failure)
