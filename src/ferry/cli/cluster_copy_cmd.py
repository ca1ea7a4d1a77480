"""``ferry cluster copy-roles``: every VM of one volume from one cluster into another.

The request goes to a node of the source cluster (``--from``), which reads and
writes both clusters' records in the etcd they share
(:mod:`ferry.host.cluster.copy_roles`). One step per call: ``--test`` (the
report, nothing changed in the source; with copied storage, how much each VM
copies), ``--run`` (stop, hand over, start in the target; with copied
storage a full copy first while they run, then only the changes while they
are stopped), ``--rollback`` (give them back as they were; copied storage:
what they wrote in the target copied back first).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from ferry.cli.cluster_vm_cmd import cluster_node
from ferry.cli.output import print_json, say
from ferry.core.network import parse_network_map
from ferry.errors import InvalidInputError

if TYPE_CHECKING:
    from ferry.client.fleet import Fleet


def copy_roles(
    source: str = typer.Option(..., "--from", help="The cluster the VMs are in now."),
    target: str = typer.Option(..., "--to", help="The cluster that takes them."),
    volume: str = typer.Option(..., "--volume", help="The volume whose VMs move (all of them)."),
    test: bool = typer.Option(False, "--test", help="Report and register; change nothing."),
    run: bool = typer.Option(False, "--run", help="Stop them in --from, start them in --to."),
    rollback: bool = typer.Option(False, "--rollback", help="Give them back to --from."),
    network_map: list[str] = typer.Option(
        [], "--network-map", metavar="SRC=DST", help="Network SRC becomes DST (repeat)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Copy Cluster Roles: move every VM of a volume into another cluster (its disks are
    copied when the two clusters' volumes are different directories)."""
    steps = [name for name, on in (("test", test), ("run", run), ("rollback", rollback)) if on]
    if len(steps) != 1:
        raise InvalidInputError("copy-roles needs exactly one of --test, --run or --rollback")
    body = {"to": target, "volume": volume, "step": steps[0],
            "network_map": parse_network_map(network_map)}  # fmt: skip

    async def ask(fleet: Fleet) -> Any:
        where = await cluster_node(fleet, source)
        return await fleet.client(where).post(f"/v1/clusters/{source}/copy-roles", body)

    from ferry.cli.vm_cmd import with_fleet

    result = with_fleet(ask)
    if as_json:
        print_json(result)
        return
    say(
        f"copy-roles {steps[0]}: volume {volume}, cluster {source} -> {target}: "
        f"{result['phase']}" + ("" if result.get("ok", True) else " (the report refuses --run)")
    )
    if result.get("picked"):
        say(f"  {result['picked']}")
    for vm in result["vms"]:
        extra = []
        for field in ("node", "target_node", "capacity", "config_version", "downtime_s"):
            if vm.get(field) is not None:
                extra.append(f"{field}={vm[field]}")
        if vm.get("copy"):
            extra.append(f"copies {_mib(vm['copy']['bytes'])} into {vm['copy']['to']}")
        done = vm.get("copied_bytes") or {}
        if "full" in done:
            extra.append(f"copied {_mib(done['full'])} running, then {_mib(done['final'])} "
                         "stopped")  # fmt: skip
        if "back" in done:
            extra.append(f"copied back {_mib(done['back'])}")
        if vm.get("missing_networks"):
            where = vm.get("missing_on") or {}
            extra.append("missing networks: " + ", ".join(
                f"{n} (on {', '.join(where[n])})" if where.get(n) else n
                for n in vm["missing_networks"]))  # fmt: skip
        say(f"  {vm['name']}: {vm['state']} " + " ".join(extra))
        for line in (vm.get("cpu_refusals") or {}).values():
            say(f"    CPU: {line}")
    for node, why in (result.get("unanswered") or {}).items():
        say(f"  node {node} of {target} did not answer, so its CPU models and networks are "
            f"not checked: {why}")  # fmt: skip


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"
