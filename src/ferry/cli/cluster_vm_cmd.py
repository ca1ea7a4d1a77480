"""``ferry cluster vm add|remove``, ``cluster drain|resume``, ``cluster upgrade-level``.

The ``ferry cluster`` group itself is :mod:`ferry.cli.cluster_cmd`, which
calls :func:`add_commands`. A command goes to the host that can do it: an add
to the VM's host, a remove to its owner (found by ``Fleet.locate``), a drain
to the node drained, a resume or upgrade-level to any node of the cluster.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from ferry.cli.output import print_json, say
from ferry.errors import FerryError, InvalidInputError, NotFoundError

if TYPE_CHECKING:
    from ferry.client.fleet import Fleet

JsonOpt = typer.Option(False, "--json", help="Print JSON.")
ClusterOpt = typer.Option(..., "--cluster", "-c", help="The cluster.")
PRIORITIES = ("high", "medium", "low")

vm_app = typer.Typer(help="Make VMs clustered, or plain again.", no_args_is_help=True)


async def cluster_node(fleet: Fleet, cluster: str, prefer: str | None = None) -> str:
    """A known host that is a node of ``cluster`` (``prefer`` if it is one)."""
    answers = await fleet.each("/v1/cluster", prefer)
    nodes = sorted(name for name, info in answers.items()
                   if isinstance(info, dict) and info.get("name") == cluster)  # fmt: skip
    if nodes:
        return nodes[0]
    if prefer is not None:
        raise NotFoundError(f"host {prefer!r} is not a node of cluster {cluster!r}")
    raise NotFoundError(f"unknown cluster {cluster!r}: no known host is a node of it "
                        "('ferry cluster list' shows the clusters)")  # fmt: skip


def _with_fleet(body: Any) -> Any:
    from ferry.cli.vm_cmd import with_fleet

    return with_fleet(body)


@vm_app.command("add")
def vm_add(
    vm: str = typer.Argument(..., help="A VM whose disks are all on cluster volumes."),
    cluster: str = ClusterOpt,
    priority: str = typer.Option("medium", "--priority", help="high, medium or low (for HA)."),
    host: str | None = typer.Option(None, "--host", "-H", help="The VM's host, if ambiguous."),
    as_json: bool = JsonOpt,
) -> None:
    """Make a VM clustered: its config and owner go to the cluster's store."""
    if priority not in PRIORITIES:
        raise InvalidInputError(f"--priority must be high, medium or low, not {priority!r}")

    async def run(fleet: Fleet) -> Any:
        where, _ = await fleet.locate(vm, host)
        return await fleet.client(where).post(f"/v1/clusters/{cluster}/vms",
                                              {"vm": vm, "priority": priority})  # fmt: skip

    view = _with_fleet(run)
    print_json(view) if as_json else say(f"VM {vm} is now in cluster {cluster} "
                                         f"(owner {view['host']})")  # fmt: skip


@vm_app.command("remove")
def vm_remove(
    vm: str = typer.Argument(..., help="A clustered VM."),
    cluster: str | None = typer.Option(
        None, "--cluster", "-c", help="Its cluster (default: the one the VM is in)."
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Take a VM out of its cluster; it stays on its node as a plain VM."""

    async def run(fleet: Fleet) -> tuple[str, Any]:
        where, view = await fleet.locate(vm)
        name = cluster or view.get("cluster")
        if name is None:
            raise InvalidInputError(f"VM {vm!r} on host {where!r} is in no cluster")
        return name, await fleet.client(where).delete(f"/v1/clusters/{name}/vms/{vm}")

    left, view = _with_fleet(run)
    print_json(view) if as_json else say(f"VM {vm} left cluster {left}; it stays on "
                                         f"{view['host']}")  # fmt: skip


def drain(
    node: str = typer.Argument(..., help="The node to empty."),
    cluster: str = ClusterOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Live-migrate every VM off a node and place nothing new there (a job)."""
    from ferry.cli.progress import follow_job

    async def run(fleet: Fleet) -> dict[str, Any]:
        await cluster_node(fleet, cluster, node)
        client = fleet.client(node)
        job = await client.post(f"/v1/clusters/{cluster}/drain", {"node": node})
        return await follow_job(client, job, as_json=as_json)

    job = _with_fleet(run)
    if job["state"] != "done":  # its error names the node and the VM it stopped at
        raise FerryError(job.get("error") or f"drain of {node} {job['state']}")
    result = job["result"]
    if as_json:
        print_json({"result": "ok", **result})
        return
    for moved in result["moved"]:
        how = "live" if moved["live"] else "off, owner only"
        say(f"  {moved['vm']} -> {moved['to']} ({how})")
    say(f"node {node} is drained ({len(result['moved'])} VMs moved); 'ferry cluster resume "
        f"{node} --cluster {cluster}' takes VMs again")  # fmt: skip


def resume(
    node: str = typer.Argument(..., help="A drained node."),
    cluster: str = ClusterOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Let a drained node take VMs again."""

    async def run(fleet: Fleet) -> Any:
        where = await cluster_node(fleet, cluster)
        return await fleet.client(where).post(f"/v1/clusters/{cluster}/resume", {"node": node})

    result = _with_fleet(run)
    print_json(result) if as_json else say(f"node {node} takes VMs again")


def upgrade_level(
    cluster: str = typer.Argument(..., help="The cluster."),
    as_json: bool = JsonOpt,
) -> None:
    """Raise the cluster's functional level once every node runs the newer version."""

    async def run(fleet: Fleet) -> Any:
        where = await cluster_node(fleet, cluster)
        return await fleet.client(where).post(f"/v1/clusters/{cluster}/upgrade-level")

    result = _with_fleet(run)
    if as_json:
        print_json(result)
    else:
        say(f"cluster {cluster} is at functional level {result['functional_level']} "
            f"(was {result['was']})")  # fmt: skip


def add_commands(app: typer.Typer) -> None:
    """Put these commands into the ``ferry cluster`` group."""
    app.add_typer(vm_app, name="vm")
    app.command("drain")(drain)
    app.command("resume")(resume)
    app.command("upgrade-level")(upgrade_level)
    from ferry.cli.cluster_copy_cmd import copy_roles

    app.command("copy-roles")(copy_roles)
