"""``ferry plan create|show|apply``: plan a fleet's move from measured facts, look at it, run it.

``create`` checks its inputs first (the policy file, the host and cluster
names), then takes the inventory from the agents (dirty rates and a
bandwidth probe included, a few seconds), makes the plan
(:mod:`ferry.core.plan.planner`) and prints it as a table, or as the plan
document with ``--json``; ``-o`` writes the plan file. ``apply`` is
:mod:`ferry.cli.plan_apply_cmd`.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ferry.cli import plan_apply_cmd
from ferry.cli.output import err, print_json, print_table, say
from ferry.cli.vm_cmd import JsonOpt, with_fleet
from ferry.core.plan import plan_file
from ferry.core.plan.calibrate import note as calibration_note
from ferry.core.plan.plan_file import Plan
from ferry.core.plan.policy import NO_POLICY, Policy, parse_policy
from ferry.core.units import format_size, parse_size
from ferry.errors import InvalidInputError, NotFoundError, StorageError

if TYPE_CHECKING:
    from ferry.client.fleet import Fleet

app = typer.Typer(help="Plan a fleet's move, look at a plan, carry it out.",
                  no_args_is_help=True)  # fmt: skip
app.command("apply")(plan_apply_cmd.apply)

MAX_POLICY_BYTES = 1024**2


def _names(values: list[str]) -> list[str]:
    """``--from a --from b`` and ``--from a,b`` alike."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _read_policy(path: Path | None) -> Policy:
    if path is None:
        return NO_POLICY
    try:
        if path.stat().st_size > MAX_POLICY_BYTES:
            raise InvalidInputError(f"policy {path} is larger than 1 MiB")
        text = path.read_text()
    except FileNotFoundError:
        raise NotFoundError(f"no policy file {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StorageError(f"cannot read policy {path}: {exc}") from None
    return parse_policy(text, name=path.name)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write plan {path}: {exc.strerror or exc}") from None


def _progress(text: str) -> None:
    """What the measuring is doing, on a terminal only: a failure stays one line."""
    if err.is_terminal:
        err.print(f"[dim]{text}[/dim]")


def _seconds(value: float) -> str:
    if value >= 120:
        return f"{value / 60:.1f}m"
    return f"{value:.1f}s" if value >= 1 else f"{value * 1000:.0f}ms"


def print_plan(plan: Plan) -> None:
    """The plan as people read it: one row a step, then reasons and warnings."""
    inv = plan.inventory
    say(f"plan of {plan.created}: {', '.join(plan.sources)} -> {', '.join(plan.destinations)}")
    for link in inv.links:
        say(f"  link {link.src} -> {link.dst}: {link.bandwidth_bps / 1024**2:.0f} MiB/s "
            f"(probe {format_size(link.probe_bytes)} in {link.probe_s:.2f} s)")  # fmt: skip
    for source in sorted({step.source for step in plan.steps}):
        host = inv.host(source)
        say(f"  {calibration_note(host.recent_moves if host else [], source)}")
    rows = []
    for step in plan.steps:
        vm = inv.find(step.preconditions.vm_uuid, replica=step.preconditions.replica)
        dirty = "-" if vm is None or vm.dirty_rate_bps is None else \
            f"{vm.dirty_rate_bps / 1024**2:.0f}M/s"  # fmt: skip
        rows.append([step.order, step.vm, step.option.value, f"{step.source} -> "
                     f"{step.destination}", step.storage or "-",
                     format_size(vm.memory) if vm else "-", dirty,
                     _seconds(step.estimate_s), _seconds(step.downtime_s),
                     len(step.warnings) or ""])  # fmt: skip
    print_table(["#", "VM", "OPTION", "MOVE", "STORAGE", "MEMORY", "DIRTY", "TIME",
                 "DOWNTIME", "WARN"], rows)  # fmt: skip
    total = sum(s.estimate_s for s in plan.steps)
    say(f"{len(plan.steps)} step(s), {_seconds(total)} in all, one after another")
    for step in plan.steps:
        mark = f" [ferry improvement: {step.improvement}]" if step.improvement else ""
        say(f"  {step.order}. {step.vm}: {step.reason}{mark}")
        for warning in step.warnings:
            say(f"     warning: {warning}")
    for warning in plan.warnings:
        say(f"warning: {warning}")


@app.command("create")
def create(
    sources: list[str] = typer.Option(
        ..., "--from", help="Hosts or cluster:NAME to move VMs from (repeat, or a,b)."
    ),
    destinations: list[str] = typer.Option(
        ..., "--to", help="Hosts or cluster:NAME to move them to (repeat, or a,b)."
    ),
    policy: Path | None = typer.Option(
        None, "--policy", help="A TOML or JSON policy: must-run, max-downtime, window per VM."
    ),
    output: Path | None = typer.Option(None, "-o", "--output", help="Write the plan file here."),
    probe: str = typer.Option(
        "32M", "--probe-size", help="Bytes the bandwidth probe sends per host pair (1M-256M)."
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Measure the sources' VMs and the links, and plan their move to the destinations."""
    from ferry.client.inventory import collect, resolve
    from ferry.core.plan.planner import Targets, make_plan

    rules = _read_policy(policy)
    probe_bytes = parse_size(probe, what="probe size")
    if not 1024**2 <= probe_bytes <= 256 * 1024**2:
        raise InvalidInputError(f"--probe-size {probe} is out of range (1M to 256M)")
    if output is not None and not output.parent.is_dir():
        raise NotFoundError(f"no directory {output.parent} to write the plan in")

    async def run(fleet: Fleet) -> Plan:
        src = await resolve(fleet, _names(sources), flag="--from")
        dst = await resolve(fleet, _names(destinations), flag="--to")
        inventory = await collect(fleet, src, dst, probe_bytes=probe_bytes, say=_progress)
        targets = Targets(src.hosts, dst.hosts, dst.clusters, src.named, dst.named)
        created = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return make_plan(inventory, targets, rules, created=created)

    plan = plan_file.sealed(with_fleet(run))
    if output is not None:
        _write(output, plan_file.dumps(plan))
    if as_json:
        print_json(plan.model_dump(mode="json"))
        return
    print_plan(plan)
    if output is not None:
        say(f"plan written to {output}; check it with 'ferry plan show {output}', run it with "
            f"'ferry plan apply {output}'")  # fmt: skip


@app.command("show")
def show(
    plan: Path = typer.Argument(..., help="The plan file (from ferry plan create)."),
    as_json: bool = JsonOpt,
) -> None:
    """Print a plan file (refused if it was edited after it was made)."""
    try:
        text = plan.read_text()
    except FileNotFoundError:
        raise NotFoundError(f"no plan file {plan}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StorageError(f"cannot read plan {plan}: {exc}") from None
    loaded = plan_file.loads(text, source=f"plan {plan}")
    if as_json:
        print_json(loaded.model_dump(mode="json"))
    else:
        print_plan(loaded)
