"""``ferry replication ...``: protect a running VM by replicating it to another host.

Commands go to the VM's primary host (found by name), which talks to the
replica; ``points`` and ``status`` also work against the replica host alone
(``--host``), which is what an admin has when the primary is lost.

Over 400 lines because it is one command group, ``ferry replication``, with
a dozen commands and the status view they share; each command is a short
function, and splitting the group would split its help and its options.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ferry.cli.output import print_json, print_table, say
from ferry.cli.vm_cmd import HostOpt, JsonOpt, with_fleet
from ferry.core.guest_agent import parse_app_consistent_every
from ferry.core.network import parse_network_map
from ferry.core.replication import (
    EXTENDED_FREQUENCIES,
    check_recovery_points,
    format_frequency,
    parse_frequency,
)
from ferry.core.units import format_size, parse_start_time
from ferry.errors import FerryError, InvalidInputError

if TYPE_CHECKING:
    from ferry.client.fleet import Fleet

app = typer.Typer(help="Replicate running VMs to a replica host.", no_args_is_help=True)

AppConsistentOpt = typer.Option(
    None, "--app-consistent-every", metavar="DURATION",
    help="Freeze the guest's file systems (through its guest agent, vm create --guest-agent) "
    "around one cycle's cut per DURATION (e.g. 1h; 'off' on set): those points are "
    "app-consistent, the others crash-consistent.",
)  # fmt: skip

ReplicaNetworkMapOpt = typer.Option(
    [], "--network-map", metavar="SRC=DST",
    help="A failover starts the replica VM with its NICs on network SRC on the replica "
    "host's network DST (repeat); MACs stay, networks not named keep their names.",
)  # fmt: skip

ReplicaSetNetworkMapOpt = typer.Option(
    [], "--network-map", metavar="SRC=DST|none",
    help="Replace the map failovers use: NICs on network SRC go on the replica host's "
    "network DST (repeat); MACs stay, networks not named keep their names. "
    "'none' clears the map (every NIC back on the network of its own name).",
)  # fmt: skip


def _set_network_map(items: list[str]) -> dict[str, str] | None:
    """``replication set --network-map``: None (unchanged), ``none`` ({}: cleared) or a map."""
    if not items:
        return None
    if any(item.strip().lower() == "none" for item in items):
        if len(items) > 1:
            raise InvalidInputError("--network-map none clears the map: give it alone, "
                                    "not with SRC=DST items")  # fmt: skip
        return {}
    return parse_network_map(items)


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "never"
    return dt.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M:%S")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} s"


def _parse_initial(text: str) -> tuple[str, str | None]:
    if text in ("network", "existing"):
        return text, None
    if text.startswith("media:") and len(text) > len("media:"):
        folder = text[len("media:") :]
        return "media", str(Path(folder).expanduser().absolute())
    raise InvalidInputError(f"--initial must be network, media:DIR or existing, not {text!r}")


async def _replica_url(fleet: Fleet, replica: str) -> str:
    """A host's address; for ``cluster:C`` (the replica broker) the addresses of C's
    nodes as the known hosts answer for their cluster, comma-separated."""
    from ferry.cli.cluster_cmd import nodes_of
    from ferry.core.replication.broker import parse_target

    target = parse_target(replica)
    if not target.cluster:
        return fleet.settings.host(replica).url
    return ",".join(fleet.settings.host(node).url for node, _ in await nodes_of(fleet, target.name))


async def _primary(fleet: Fleet, name: str, host: str | None) -> str:
    where, _ = await fleet.locate(name, host)
    return where


def _show_status(status: dict[str, Any]) -> None:
    say(f"VM {status['vm']}: {status['state']} ({status['health']}), "
        f"{status['primary']} -> {status['replica']} every "
        f"{format_frequency(status['frequency_s'])}")  # fmt: skip
    rows = [
        ["last replication", _when(status.get("last_replication_time"))],
        ["lag", _seconds(status.get("lag_s"))],
    ]
    if status.get("role") == "primary":
        rows += [
            ["cycles ok / missed / failed", f"{status['success_count']} / "
             f"{status['miss_count']} / {status['failure_count']}"],
            ["pending", format_size(status.get("pending_bytes") or 0)],
            ["RPO now / p99", f"{_seconds(status.get('rpo_s'))} / "
             f"{_seconds(status.get('rpo_p99_s'))} (last "
             f"{_seconds(status.get('rpo_window_s'))})"],
            ["recovery points kept", f"{status['recovery_points']} + latest"],
        ]  # fmt: skip
        if status.get("app_consistent_every_s"):
            rows.append(["app-consistent every", f"{_seconds(status['app_consistent_every_s'])}: "
                         f"{status['app_consistent_count']} points, "
                         f"{status['app_consistent_failure_count']} failed freezes"])  # fmt: skip
    else:
        rows.append(["recovery points", str(status.get("points"))])
    if status.get("origin"):
        rows.append(["extended from", f"{status['primary']} (the VM runs on {status['origin']})"])
    for reason in status.get("health_reasons") or []:
        rows.append(["health", reason])
    if status.get("error"):
        rows.append(["error", status["error"]])
    ext = status.get("extended")
    if ext:
        rows += [
            ["extended to", f"{ext['host']} every {format_frequency(ext['frequency_s'])}: "
             f"{ext['state']} ({ext['health']})"],
            ["extended: last / lag", f"{_when(ext.get('last_replication_time'))} / "
             f"{_seconds(ext.get('lag_s'))}"],
            ["extended: latest point", str(ext.get("latest_point"))],
        ]  # fmt: skip
        for reason in ext.get("health_reasons") or []:
            rows.append(["extended: health", reason])
        if ext.get("error"):
            rows.append(["extended: error", ext["error"]])
    print_table(["", ""], rows)


@app.command("enable")
def enable(
    name: str,
    replica: str = typer.Option(
        ..., "--replica", help="The replica host, or cluster:C (any node of cluster C)."
    ),
    frequency: str = typer.Option(
        "5m",
        "--frequency",
        help="5s (continuous: points thinned as they age; at most 10 VMs per host), 30s, 5m "
        "or 15m.",
    ),
    recovery_points: int = typer.Option(
        4, "--recovery-points", help="Older points kept besides the latest (0..24)."
    ),
    initial: str = typer.Option(
        "network", "--initial", help="network, media:DIR (carry DIR over) or existing."
    ),
    compression: str = typer.Option("on", "--compression", help="on or off (zstd)."),
    initial_at: str | None = typer.Option(
        None, "--initial-at", help="Start the initial copy later: HH:MM, an ISO time or 2h."
    ),
    network_map: list[str] = ReplicaNetworkMapOpt,
    app_consistent_every: str | None = AppConsistentOpt,
    host: str | None = HostOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Start replicating a running VM; the initial copy runs in the background."""
    from ferry.cli.progress import follow_job

    networks = parse_network_map(network_map)
    app_every = parse_app_consistent_every(app_consistent_every) if app_consistent_every else None
    seconds = parse_frequency(frequency)
    check_recovery_points(recovery_points)
    method, media = _parse_initial(initial)
    if compression not in ("on", "off"):
        raise InvalidInputError(f"--compression must be on or off, not {compression!r}")
    after = parse_start_time(initial_at, now=dt.datetime.now().astimezone()) if initial_at else None
    if after is not None and method != "network":
        raise InvalidInputError("--initial-at schedules a network initial copy only")

    async def run(fleet: Fleet) -> dict[str, Any]:
        primary = await _primary(fleet, name, host)
        status: dict[str, Any] = await fleet.client(primary).post(
            f"/v1/vms/{name}/replication",
            {"replica": replica, "replica_url": await _replica_url(fleet, replica),
             "frequency_s": seconds,
             "recovery_points": recovery_points, "initial": method, "media_dir": media,
             "compression": compression == "on", "initial_after": after,
             "network_map": networks, "app_consistent_every_s": app_every},
        )  # fmt: skip
        if method == "network" and after is None:
            # Follow the initial copy job once the scheduler has started it.
            job = await _initial_job(fleet, primary, status["vm"])
            if job is not None:
                done = await follow_job(fleet.client(primary), job, as_json=as_json)
                if done["state"] != "done":
                    raise FerryError(
                        f"initial copy of VM {name} failed: {done.get('error')}; ferry retries "
                        f"at the next cycle ('ferry replication status {name}')"
                    )
            status = await fleet.client(primary).get(f"/v1/vms/{name}/replication")
        return status

    status = with_fleet(run)
    if as_json:
        print_json(status)
        return
    if method == "media":
        say(f"initial copy of VM {name} written to {media}; carry it to {replica} and run "
            f"'ferry replication import-initial {media} --host {replica}'")  # fmt: skip
    elif method == "existing":
        say(f"VM {name}: comparing with the copy on {replica}; only differences are sent")
    elif after is not None:
        say(f"VM {name}: the initial copy starts at {_when(after)}")
    _show_status(status)


async def _initial_job(fleet: Fleet, host: str, vm: str) -> dict[str, Any] | None:
    import asyncio

    for _ in range(40):
        jobs = await fleet.client(host).get("/v1/jobs")
        mine = [j for j in jobs if j["vm"] == vm and j["kind"] == "replication-initial"]
        if mine:
            return dict(mine[-1])
        await asyncio.sleep(0.25)
    return None


def _print_status(found: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(found)
    else:
        _show_status(found)


def _fetch(name: str, host: str | None) -> dict[str, Any]:
    async def run(fleet: Fleet) -> dict[str, Any]:
        where = await _primary(fleet, name, host)
        reply: dict[str, Any] = await fleet.client(where).get(f"/v1/vms/{name}/replication")
        return reply

    return with_fleet(run)


@app.command("status")
def status(name: str, host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """State, health, lag and cycle counts of a VM's replication."""

    found = _fetch(name, host)
    if as_json:
        print_json({k: v for k, v in found.items() if k != "statistics"})
    else:
        _show_status(found)


@app.command("measure")
def measure(name: str, host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """Status plus delta sizes and cycle times (like Measure-VMReplication)."""

    found = _fetch(name, host)
    stats = found.pop("statistics", None) or {}
    merged = {**found, **stats}
    if as_json:
        print_json(merged)
        return
    _show_status(found)
    if stats:
        print_table(["", ""], [
            ["replicated", format_size(stats["replicated_bytes"])],
            ["average delta", format_size(stats["average_delta_bytes"] or 0)],
            ["largest delta", format_size(stats["max_delta_bytes"] or 0)],
            ["average cycle", _seconds(stats["average_cycle_s"])],
            ["longest cycle", _seconds(stats["max_cycle_s"])],
            ["network failures", stats["network_failure_count"]],
        ])  # fmt: skip


@app.command("points")
def points(name: str, host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """Recovery points on the replica, newest last."""

    async def run(fleet: Fleet) -> list[dict[str, Any]]:
        where = await _primary(fleet, name, host)
        reply: list[dict[str, Any]] = await fleet.client(where).get(
            f"/v1/vms/{name}/replication/points"
        )
        return reply

    found = with_fleet(run)
    if as_json:
        print_json(found)
    else:
        rows = [[p["id"], _when(p["time"]), format_size(p["size"]),
                 "app" if p.get("app_consistent") else "crash"] for p in found]  # fmt: skip
        print_table(["ID", "TIME", "SIZE", "CONSISTENT"], rows)


@app.command("sync")
def sync(name: str, host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """Run a replication cycle now and wait for it."""

    async def run(fleet: Fleet) -> dict[str, Any]:
        where = await _primary(fleet, name, host)
        reply: dict[str, Any] = await fleet.client(where).post(f"/v1/vms/{name}/replication/sync")
        return reply

    outcome = with_fleet(run)
    if as_json:
        print_json(outcome)
    if outcome["result"] not in ("ok", "skipped"):
        raise FerryError(f"replication cycle of VM {name} failed: {outcome.get('error')}")
    if not as_json:
        if outcome["result"] == "skipped":
            say(f"VM {name}: nothing to do ({outcome.get('reason')})")
        else:
            sent = format_size(outcome["bytes"])
            say(f"VM {name}: recovery point {outcome.get('point')} on the replica, "
                f"{sent} sent in {outcome['duration_s']:.1f} s")  # fmt: skip


def _simple(action: str, method: str, suffix: str, message: str) -> Any:
    def command(name: str, host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
        async def run(fleet: Fleet) -> dict[str, Any]:
            where = await _primary(fleet, name, host)
            reply: dict[str, Any] = await fleet.client(where).call(
                method, f"/v1/vms/{name}/replication{suffix}"
            )
            return reply

        found = with_fleet(run)
        if as_json:
            print_json(found)
        else:
            say(message.format(name=name, **found))

    command.__doc__ = f"{action.capitalize()} replication of a VM."
    return command


app.command("pause")(_simple("pause", "POST", "/pause", "replication of VM {name} is {state}"))
app.command("resume")(_simple("resume", "POST", "/resume", "replication of VM {name} is {state}"))
app.command("remove")(
    _simple("remove", "DELETE", "", "replication of VM {name} to {replica} removed")
)


@app.command("set")
def set_(
    name: str,
    replica: str | None = typer.Option(
        None,
        "--replica",
        help="Move the replica VM and its points to this host (or point at "
        "it if the replica is there already); a test failover ends.",
    ),
    frequency: str | None = typer.Option(
        None,
        "--frequency",
        help="5s (continuous: points thinned as they age; at most 10 VMs per host), 30s, 5m "
        "or 15m.",
    ),
    thumbprint: str | None = typer.Option(
        None, "--certificate-thumbprint", help="SHA-256 of the replica's new certificate."
    ),
    recovery_points: int | None = typer.Option(None, "--recovery-points", help="0..24."),
    network_map: list[str] = ReplicaSetNetworkMapOpt,
    app_consistent_every: str | None = AppConsistentOpt,
    host: str | None = HostOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Change a relationship: frequency, retention, replica host, pinned certificate, networks."""
    seconds = parse_frequency(frequency) if frequency else None
    if recovery_points is not None:
        check_recovery_points(recovery_points)
    networks = _set_network_map(network_map)
    app_every = parse_app_consistent_every(app_consistent_every) if app_consistent_every else None
    if (replica is None and seconds is None and thumbprint is None and recovery_points is None
            and networks is None and app_every is None):  # fmt: skip
        raise InvalidInputError("nothing to set: give --replica, --frequency, "
                                "--certificate-thumbprint, --recovery-points or "
                                "--network-map or --app-consistent-every")  # fmt: skip

    async def run(fleet: Fleet) -> dict[str, Any]:
        where = await _primary(fleet, name, host)
        body = {"replica": replica, "replica_url": await _replica_url(fleet, replica) if replica
                else None, "frequency_s": seconds, "recovery_points": recovery_points,
                "certificate_thumbprint": thumbprint, "network_map": networks,
                "app_consistent_every_s": app_every}  # fmt: skip
        reply: dict[str, Any] = await fleet.client(where).call(
            "PATCH", f"/v1/vms/{name}/replication", body=body
        )
        return reply

    _print_status(with_fleet(run), as_json)


@app.command("import-initial")
def import_initial(
    folder: Path,
    host: str = typer.Option(..., "--host", "-H", help="The replica host."),
    as_json: bool = JsonOpt,
) -> None:
    """On the replica host: link an initial copy written with --initial media:DIR."""
    path = str(folder.expanduser().absolute())
    found = with_fleet(lambda fleet: fleet.client(host).post(
        "/v1/replication/import-initial", {"folder": path}))  # fmt: skip
    if as_json:
        print_json(found)
    else:
        say(f"VM {found['vm']}: initial copy imported on {host} ({format_size(found['bytes'])}); "
            "the primary sends changes from its next cycle")  # fmt: skip


@app.command("reverse")
def reverse(name: str, host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """After a failover: replicate back to the old primary, using its disks as the initial copy."""
    from ferry.cli.failover_cmd import follow, replica_host

    async def run(fleet: Fleet) -> dict[str, Any]:
        where = await replica_host(fleet, name, host)
        return await follow(fleet, where, f"/v1/vms/{name}/replication/reverse", None,
                            f"reverse replication of VM {name}", as_json)  # fmt: skip

    _print_status(with_fleet(run), as_json)


@app.command("extend")
def extend(
    name: str,
    to: str | None = typer.Option(None, "--to", help="The extended (third) host."),
    frequency: str | None = typer.Option(
        None, "--frequency", help="5m or 15m, not more often than the primary (default 5m)."
    ),
    recovery_points: int | None = typer.Option(
        None, "--recovery-points", help="Points the extended host keeps (default: as the replica)."
    ),
    remove: bool = typer.Option(False, "--remove", help="End the extension instead."),
    host: str | None = typer.Option(None, "--host", "-H", help="The replica host (found)."),
    as_json: bool = JsonOpt,
) -> None:
    """On the replica: replicate its recovery points onward to a third host."""
    from ferry.cli.failover_cmd import replica_host
    from ferry.cli.progress import follow_job

    if remove and (to or frequency or recovery_points is not None):
        raise InvalidInputError("--remove takes no --to, --frequency or --recovery-points")
    if not remove and not to:
        raise InvalidInputError("give --to HOST (or --remove to end the extension)")
    seconds = parse_frequency(frequency) if frequency else None
    if seconds is not None and seconds not in EXTENDED_FREQUENCIES:
        raise InvalidInputError(f"invalid extended replication frequency {frequency!r}: "
                                "use 5m or 15m")  # fmt: skip
    if recovery_points is not None:
        check_recovery_points(recovery_points)

    async def run(fleet: Fleet) -> dict[str, Any]:
        where = await replica_host(fleet, name, host)
        client = fleet.client(where)
        if remove:
            removed: dict[str, Any] = await client.delete(f"/v1/vms/{name}/replication/extend")
            return removed
        assert to is not None
        view: dict[str, Any] = await client.post(f"/v1/vms/{name}/replication/extend", {
            "to": to, "to_url": await _replica_url(fleet, to), "frequency_s": seconds,
            "recovery_points": recovery_points})  # fmt: skip
        job = await _initial_job(fleet, where, name)
        if job is not None:
            done = await follow_job(client, job, as_json=as_json)
            if done["state"] != "done":
                raise FerryError(f"initial copy of VM {name} to {to} failed: "
                                 f"{done.get('error')}; ferry retries at the next "
                                 "cycle")  # fmt: skip
        status: dict[str, Any] = await client.get(f"/v1/vms/{name}/replication")
        return status["extended"] or view

    found = with_fleet(run)
    if as_json:
        print_json(found)
    elif remove:
        kept = " (it keeps its copy as a VM that is off)" if found.get("extended_vm_kept") else ""
        say(f"extended replication of VM {name} to {found['extended']} ended{kept}")
    else:
        say(f"VM {name}: {found['from']} replicates it on to {found['host']} every "
            f"{format_frequency(found['frequency_s'])}; {found['state']}, latest point "
            f"{found['latest_point']}")  # fmt: skip
