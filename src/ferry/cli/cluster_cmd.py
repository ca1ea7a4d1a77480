"""``ferry cluster ...``: make, join, leave and look at clusters of hosts on etcd.

The CLI reaches a cluster through the agents of the hosts in $FERRY_HOME: it
asks each host which cluster it is in (``GET /v1/cluster``) and sends a
cluster's requests to one of its nodes, trying the next when one does not
answer. Clustered VMs, drain, resume and upgrade-level are
:mod:`ferry.cli.cluster_vm_cmd` (added to this group by its ``add_commands``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import typer

from ferry.cli import cluster_vm_cmd
from ferry.cli.output import print_json, print_table, say
from ferry.core.units import format_size
from ferry.errors import ConnectionFailedError, InvalidInputError, NotFoundError
from ferry.errors import StoreUnavailableError as _StoreAway

if TYPE_CHECKING:
    from ferry.client.fleet import Fleet

app = typer.Typer(help="Clusters of hosts that share volumes and an etcd.", no_args_is_help=True)
volume_app = typer.Typer(help="Volumes every node of a cluster sees.", no_args_is_help=True)
app.add_typer(volume_app, name="volume")

JsonOpt = typer.Option(False, "--json", help="Print JSON.")
HostOpt = typer.Option(..., "--host", "-H", help="The host.")
ClusterOpt = typer.Option(..., "--cluster", "-c", help="The cluster.")


def _with_fleet(body: Callable[[Fleet], Awaitable[Any]]) -> Any:
    from ferry.cli.vm_cmd import with_fleet

    return with_fleet(body)


def _etcd_urls(text: str) -> list[str]:
    urls = [u.strip() for u in text.split(",") if u.strip()]
    if not urls:
        raise InvalidInputError("--etcd needs at least one URL (https://HOST:PORT[,...])")
    return urls


async def memberships(fleet: Fleet) -> dict[str, dict[str, Any]]:
    """host -> its ``GET /v1/cluster`` answer, for the hosts that are in a cluster."""
    answers = await fleet.each("/v1/cluster")
    return {host: info for host, info in answers.items() if isinstance(info, dict)}


async def nodes_of(fleet: Fleet, cluster: str) -> list[tuple[str, dict[str, Any]]]:
    """The known hosts that are nodes of ``cluster``; NotFoundError if none is."""
    found = sorted((host, info) for host, info in (await memberships(fleet)).items()
                   if info.get("name") == cluster)  # fmt: skip
    if not found:
        raise NotFoundError(f"unknown cluster {cluster!r}: no known host is a node of it "
                            "('ferry cluster list' shows the clusters)")  # fmt: skip
    return found


async def ask_cluster(fleet: Fleet, cluster: str, method: str, path: str,
                      body: dict[str, Any] | None = None) -> Any:  # fmt: skip
    """One request to a node of ``cluster``; the next node if one cannot answer."""
    last: Exception | None = None
    for host, _ in await nodes_of(fleet, cluster):
        try:
            return await fleet.client(host).call(method, path, body=body)
        except (ConnectionFailedError, _StoreAway) as exc:
            last = exc
    assert last is not None
    raise last


def _host_for_create(fleet: Fleet, host: str | None) -> str:
    if host is not None:
        fleet.settings.host(host)
        return host
    names = fleet.host_names()
    if len(names) == 1:
        return names[0]
    raise InvalidInputError(f"pass --host: which of the known hosts ({', '.join(names)}) "
                            "creates the cluster?")  # fmt: skip


@app.command("create")
def create(
    name: str,
    etcd: str = typer.Option(..., "--etcd", help="etcd URL(s), comma-separated."),
    etcd_tls: str | None = typer.Option(
        None,
        "--etcd-tls",
        help="Dir on the host with ca-cert.pem, client-cert.pem, "
        "client-key.pem for etcd (default: the host's own TLS dir).",
    ),
    host: str | None = typer.Option(
        None, "--host", "-H", help="The host that creates it and becomes its first node."
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Create a cluster in an etcd; the host becomes its first node."""
    body = {"name": name, "etcd": _etcd_urls(etcd), "etcd_tls": etcd_tls}

    async def run(fleet: Fleet) -> Any:
        return await fleet.client(_host_for_create(fleet, host)).post("/v1/cluster/create", body)

    result = _with_fleet(run)
    if as_json:
        print_json(result)
    else:
        say(f"cluster {name} created in etcd at {', '.join(result['etcd'])}; "
            f"{result['node']} is its first node")  # fmt: skip


@app.command("join")
def join(
    name: str,
    host: str = HostOpt,
    etcd: str | None = typer.Option(
        None, "--etcd", help="etcd URL(s), if no known host is a node of the cluster yet."
    ),
    etcd_tls: str | None = typer.Option(None, "--etcd-tls", help="As for create."),
    as_json: bool = JsonOpt,
) -> None:
    """Make a host a node of a cluster (its etcd is learnt from a known node)."""

    async def run(fleet: Fleet) -> Any:
        fleet.settings.host(host)
        if etcd is not None:
            body = {"name": name, "etcd": _etcd_urls(etcd), "etcd_tls": etcd_tls}
        else:
            _, info = (await nodes_of(fleet, name))[0]
            body = {"name": name, "etcd": info["etcd"], "etcd_tls": etcd_tls or info["etcd_tls"]}
        return await fleet.client(host).post("/v1/cluster/join", body)

    result = _with_fleet(run)
    print_json(result) if as_json else say(f"{host} joined cluster {name}")


@app.command("leave")
def leave(name: str, host: str = HostOpt, as_json: bool = JsonOpt) -> None:
    """Take a host out of a cluster (refused while it owns VMs, or is the last node)."""
    result = _with_fleet(lambda fleet: fleet.client(host).post("/v1/cluster/leave",
                                                               {"name": name}))  # fmt: skip
    print_json(result) if as_json else say(f"{host} left cluster {name}")


@app.command("list")
def list_clusters(as_json: bool = JsonOpt) -> None:
    """The clusters the known hosts are in."""

    async def run(fleet: Fleet) -> list[dict[str, Any]]:
        names = sorted({info["name"] for info in (await memberships(fleet)).values()})
        views = []
        for cluster in names:
            try:
                view = await ask_cluster(fleet, cluster, "GET", f"/v1/clusters/{cluster}")
            except (ConnectionFailedError, _StoreAway) as exc:
                view = {"name": cluster, "etcd": [], "leader": None,
                        "functional_level": None, "nodes": [], "error": str(exc)}  # fmt: skip
            views.append({key: view.get(key) for key in
                          ("name", "etcd", "leader", "functional_level", "error")}
                         | {"nodes": [{"name": n["name"], "state": n["state"]}
                                      for n in view["nodes"]]})  # fmt: skip
        return views

    views = _with_fleet(run)
    if as_json:
        print_json(views)
        return
    if not views:
        say("no known host is in a cluster")
        return
    print_table(["CLUSTER", "LEADER", "LEVEL", "NODES UP", "ETCD"],
                [[v["name"], v["leader"], v["functional_level"],
                  f"{sum(n['state'] == 'up' for n in v['nodes'])}/{len(v['nodes'])}",
                  ",".join(v["etcd"]) or v.get("error")] for v in views])  # fmt: skip


@app.command("show")
def show(name: str, as_json: bool = JsonOpt) -> None:
    """A cluster: leader, functional level, nodes with their states, volumes."""
    view = _with_fleet(lambda fleet: ask_cluster(fleet, name, "GET", f"/v1/clusters/{name}"))
    if as_json:
        print_json(view)
        return
    say(f"cluster {view['name']}: leader {view['leader'] or '-'}, functional level "
        f"{view['functional_level']}, etcd {', '.join(view['etcd'])}")  # fmt: skip
    print_table(["NODE", "STATE", "VMS", "LEVEL", "VERSION", "FREE MEMORY", "URL"],
                [[n["name"], n["state"], n["vms"], n["functional_level"], n["version"],
                  format_size(n["memory_free"]) if n["memory_free"] else None, n["url"]]
                 for n in view["nodes"]])  # fmt: skip
    if view["volumes"]:
        print_table(["VOLUME", "PATH"], [[v["name"], v["path"]] for v in view["volumes"]])


@app.command("events")
def events(cluster: str, as_json: bool = JsonOpt) -> None:
    """What happened in a cluster (joins, leader changes, node losses, restarts), oldest first."""
    found = _with_fleet(lambda fleet: ask_cluster(fleet, cluster, "GET",
                                                  f"/v1/clusters/{cluster}/events"))  # fmt: skip
    if as_json:
        print_json(found)
        return

    def when(at: float) -> str:
        return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]

    print_table(["TIME (UTC)", "KIND", "NODE", "VM", "REASON"],
                [[when(e["at"]), e["kind"], e["node"], e["vm"], e["reason"]]
                 for e in found])  # fmt: skip


@volume_app.command("add")
def volume_add(name: str, path: str, cluster: str = ClusterOpt, as_json: bool = JsonOpt) -> None:
    """Add a volume: refused unless every node sees the same directory at PATH."""
    result = _with_fleet(lambda fleet: ask_cluster(fleet, cluster, "POST",
                                                   f"/v1/clusters/{cluster}/volumes",
                                                   {"name": name, "path": path}))  # fmt: skip
    if as_json:
        print_json(result)
    else:
        say(f"volume {name} added to cluster {cluster} at {path}")


cluster_vm_cmd.add_commands(app)
