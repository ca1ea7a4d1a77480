"""``ferry failover ...``: rehearse and run disaster recovery of a replicated VM.

``test``, ``stop-test``, ``start``, ``complete`` and ``cancel`` act on the
replica host (found by the VM's replication role, or ``--host``); ``planned``
runs from the primary host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from ferry.cli.output import print_json, say
from ferry.cli.vm_cmd import JsonOpt, with_fleet
from ferry.errors import FerryError

if TYPE_CHECKING:
    from ferry.client.fleet import Fleet

app = typer.Typer(help="Test, planned and unplanned failover of replicated VMs.",
                  no_args_is_help=True)  # fmt: skip

HostOpt = typer.Option(None, "--host", "-H", help="The replica host (found by default).")
PointOpt = typer.Option(None, "--point", help="Recovery point id (default: the latest).")


async def replica_host(fleet: Fleet, name: str, host: str | None) -> str:
    """The host that holds VM ``name`` as a replica (:meth:`Fleet.replica_host`)."""
    return await fleet.replica_host(name, host)


def _report(found: dict[str, Any], as_json: bool, message: str) -> None:
    if as_json:
        print_json(found)
    else:
        say(message)


async def follow(fleet: Fleet, where: str, path: str, body: dict[str, Any] | None,
                 what: str, as_json: bool) -> dict[str, Any]:  # fmt: skip
    """POST a failover job, follow it (progress bar or JSON event lines), return its result."""
    from ferry.cli.progress import follow_job

    client = fleet.client(where)
    job = await follow_job(client, await client.post(path, body), as_json=as_json)
    if job["state"] != "done":
        raise FerryError(f"{what} {job['state']}: {job.get('error')}")
    result: dict[str, Any] = job["result"]
    return result


def _on_replica(action: str, name: str, host: str | None, body: dict[str, Any],
                as_json: bool) -> dict[str, Any]:  # fmt: skip
    async def run(fleet: Fleet) -> dict[str, Any]:
        where = await replica_host(fleet, name, host)
        return await follow(fleet, where, f"/v1/vms/{name}/failover/{action}", body,
                            f"failover {action} of VM {name}", as_json)  # fmt: skip

    return with_fleet(run)


@app.command("test")
def test(
    name: str,
    point: int | None = PointOpt,
    test_network: str | None = typer.Option(
        None, "--test-network", metavar="NET",
        help="Put the test VM's NICs on this network of the replica host (new MACs); "
        "without it the test VM has no NIC, so a drill never meets production.",
    ),
    host: str | None = HostOpt,
    as_json: bool = JsonOpt,
) -> None:  # fmt: skip
    """Boot a disposable copy <VM>-test on a recovery point; replication goes on."""
    body: dict[str, Any] = {"point": point}
    if test_network is not None:
        body["test_network"] = test_network
    found = _on_replica("test", name, host, body, as_json)
    _report(
        found,
        as_json,
        f"test failover {found['test_vm']} runs on {found['host']} from recovery point "
        f"{found['point']}; 'ferry failover stop-test {name}' ends it",
    )


@app.command("stop-test")
def stop_test(name: str, host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """Delete the test failover VM and its overlays."""
    found = _on_replica("stop-test", name, host, {}, as_json)
    _report(found, as_json, f"test failover {found['test_vm']} deleted")


@app.command("start")
def start(
    name: str,
    point: int | None = PointOpt,
    force: bool = typer.Option(
        False, "--force", help="Even though the primary answers and runs the VM (split brain)."
    ),
    host: str | None = HostOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Unplanned failover: start the replica VM from a recovery point."""
    found = _on_replica("start", name, host, {"point": point, "force": force}, as_json)
    _report(
        found,
        as_json,
        f"VM {name} runs on {found['host']} from recovery point {found['point']}; "
        f"'ferry failover complete {name}' makes it final, 'cancel' goes back",
    )


@app.command("complete")
def complete(name: str, host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """Make a failover final: the other recovery points are dropped."""
    found = _on_replica("complete", name, host, {}, as_json)
    _report(
        found,
        as_json,
        f"failover of VM {name} to {found['host']} is final (recovery point {found['point']})",
    )


@app.command("cancel")
def cancel(name: str, host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """Undo a failover: the VM on the replica stops and is a replica again."""
    found = _on_replica("cancel", name, host, {}, as_json)
    _report(
        found, as_json, f"failover of VM {name} cancelled; {found['host']} holds its replica again"
    )


@app.command("planned")
def planned(name: str, host: str | None = typer.Option(None, "--host", "-H"),
            as_json: bool = JsonOpt) -> None:  # fmt: skip
    """From the primary: shut down, send the last changes, start on the replica, reverse."""

    async def run(fleet: Fleet) -> dict[str, Any]:
        where, _ = await fleet.locate(name, host)
        return await follow(fleet, where, f"/v1/vms/{name}/failover/planned", None,
                            f"planned failover of VM {name}", as_json)  # fmt: skip

    result = with_fleet(run)
    if as_json:
        print_json(result)
    else:
        say(f"VM {name} now runs on {result['host']} (no data lost: its last changes went "
            f"first); replication flows back ({result['total_s']:.1f} s in all)")  # fmt: skip
