"""``ferry replica-server ...``: let a host receive replication from allowed primaries."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ferry.cli.output import print_json, print_table, say
from ferry.cli.vm_cmd import JsonOpt, with_fleet
from ferry.errors import InvalidInputError

if TYPE_CHECKING:
    from ferry.client.fleet import Fleet

app = typer.Typer(help="Replica server settings of a host.", no_args_is_help=True)


def parse_enable_args(tokens: Sequence[str]) -> dict[str, Any]:
    """``--storage DIR [--allow PATTERN [--storage DIR] [--trust-group G]]... [--allow-any]``.

    A ``--storage`` or ``--trust-group`` after an ``--allow`` belongs to that
    entry; a ``--storage`` before any ``--allow`` is the server's default.
    """
    settings: dict[str, Any] = {"enabled": True, "storage": None, "allow": [],
                                "allow_any": False}  # fmt: skip
    entry: dict[str, Any] | None = None
    items = list(tokens)
    while items:
        flag = items.pop(0)
        if flag == "--allow-any":
            settings["allow_any"] = True
            continue
        if flag not in ("--storage", "--allow", "--trust-group"):
            raise InvalidInputError(f"unknown option {flag!r} for replica-server enable")
        if not items or items[0].startswith("--"):
            raise InvalidInputError(f"{flag} needs a value")
        value = items.pop(0)
        if flag == "--allow":
            entry = {"pattern": value}
            settings["allow"].append(entry)
        elif flag == "--trust-group":
            if entry is None:
                raise InvalidInputError("--trust-group belongs to an --allow PATTERN before it")
            entry["trust_group"] = value
        elif entry is None:
            settings["storage"] = value
        else:
            entry["storage"] = value
    return settings


def _show(settings: dict[str, Any], host: str, as_json: bool) -> None:
    if as_json:
        print_json({"host": host, **settings})
        return
    state = "enabled" if settings["enabled"] else "disabled"
    say(f"host {host}: replica server {state}, default storage {settings['storage'] or '-'}"
        + (", accepts any host of this CA" if settings["allow_any"] else ""))  # fmt: skip
    if settings["allow"]:
        print_table(["ALLOW", "STORAGE", "TRUST GROUP"],
                    [[e["pattern"], e.get("storage") or settings["storage"],
                      e.get("trust_group")] for e in settings["allow"]])  # fmt: skip


@app.command(
    "enable",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def enable(
    ctx: typer.Context,
    host: str | None = typer.Option(None, "--host", "-H", help="The host."),
    cluster: str | None = typer.Option(
        None, "--cluster", "-c", help="A cluster instead: any of its nodes accepts a cycle."
    ),
    volume: str | None = typer.Option(
        None, "--volume", help="With --cluster: the cluster volume replica VMs live on."
    ),
    ca: Path | None = typer.Option(
        None,
        "--ca",
        help="With --cluster: the CA dir, to add the cluster's name to node "
        "certificates that lack it.",
    ),
) -> None:
    """Accept replication: --storage DIR [--allow PATTERN [--storage DIR] [--trust-group G]]...
    [--allow-any]. Patterns match the primary's host name (shell style: host-*). With
    --cluster C --volume V: the cluster accepts, its replica VMs on V."""
    body = parse_enable_args(ctx.args)
    _target(host, cluster)
    if cluster is not None:
        _enable_cluster(cluster, volume, ca, body)
        return
    assert host is not None
    if volume is not None or ca is not None:
        raise InvalidInputError("--volume and --ca go with --cluster; a host takes --storage DIR")
    settings = with_fleet(lambda fleet: fleet.client(host).call("PUT", "/v1/replica-server",
                                                                body=body))  # fmt: skip
    _show(settings, host, as_json=False)


def _enable_cluster(cluster: str, volume: str | None, ca: Path | None,
                    body: dict[str, Any]) -> None:  # fmt: skip
    """The settings once in the cluster's store; every node certificate names the cluster."""
    from ferry.cli.cluster_cmd import ask_cluster, nodes_of
    from ferry.client.pki import add_cluster_name, cluster_names_missing
    from ferry.core.replication.authority import cluster_san

    if volume is None:
        raise InvalidInputError(
            f"a replica cluster keeps its replica VMs on one of its "
            f"volumes: give --volume V ('ferry cluster show {cluster}')"
        )
    if body["storage"] or any(e.get("storage") for e in body["allow"]):
        raise InvalidInputError("--storage is for a host; a cluster's replica VMs go on "
                                "--volume V")  # fmt: skip
    request = {
        "volume": volume,
        "allow_any": body["allow_any"],
        "allow": [{k: v for k, v in e.items() if k != "storage"} for e in body["allow"]],
    }
    name = cluster_san(cluster)

    async def run(fleet: Fleet) -> dict[str, Any]:
        nodes = [node for node, _ in await nodes_of(fleet, cluster)]
        missing = await cluster_names_missing(fleet, nodes, name)
        if missing and ca is None:
            raise InvalidInputError(f"the certificates of {', '.join(missing)} do not name "
                                    f"{name}: pass --ca DIR to re-issue them with it")  # fmt: skip
        settings: dict[str, Any] = await ask_cluster(
            fleet, cluster, "PUT", f"/v1/clusters/{cluster}/replica-server", request
        )
        if missing:
            assert ca is not None
            await add_cluster_name(fleet, ca, missing, name)
        settings["reissued"] = missing
        return settings

    settings = with_fleet(run)
    say(f"cluster {cluster}: replica server enabled, replica VMs on volume {volume} "
        f"({settings['storage']})" + (", accepts any host of this CA"
                                      if settings["allow_any"] else ""))  # fmt: skip
    if settings["reissued"]:
        say(f"  certificates re-issued with {name}: {', '.join(settings['reissued'])}")
    if settings["allow"]:
        print_table(
            ["ALLOW", "TRUST GROUP"],
            [[e["pattern"], e.get("trust_group")] for e in settings["allow"]],
        )


def _target(host: str | None, cluster: str | None) -> None:
    if (host is None) == (cluster is None):
        raise InvalidInputError("name the replica server: --host H or --cluster C")


def _on_cluster(cluster: str, method: str) -> dict[str, Any]:
    from ferry.cli.cluster_cmd import ask_cluster

    async def run(fleet: Fleet) -> dict[str, Any]:
        found: dict[str, Any] = await ask_cluster(
            fleet, cluster, method, f"/v1/clusters/{cluster}/replica-server"
        )
        return found

    result: dict[str, Any] = with_fleet(run)
    return result


HostOrNone = typer.Option(None, "--host", "-H", help="The host.")
ClusterOrNone = typer.Option(None, "--cluster", "-c", help="A cluster instead (replica broker).")


@app.command("show")
def show(host: str | None = HostOrNone, cluster: str | None = ClusterOrNone,
         as_json: bool = JsonOpt) -> None:  # fmt: skip
    """Show a host's (or a cluster's) replica server settings."""
    _target(host, cluster)
    if cluster is not None:
        found = _on_cluster(cluster, "GET")
        if as_json:
            print_json(found)
            return
        state = "enabled" if found["enabled"] else "disabled"
        say(f"cluster {cluster}: replica server {state}, storage {found['storage'] or '-'}"
            + (", accepts any host of this CA" if found["allow_any"] else ""))  # fmt: skip
        if found["allow"]:
            print_table(["ALLOW", "TRUST GROUP"],
                        [[e["pattern"], e.get("trust_group")] for e in found["allow"]])  # fmt: skip
        return
    assert host is not None
    settings = with_fleet(lambda fleet: fleet.client(host).get("/v1/replica-server"))
    _show(settings, host, as_json)


@app.command("disable")
def disable(host: str | None = HostOrNone, cluster: str | None = ClusterOrNone) -> None:
    """Stop accepting replication (the settings are kept for a later enable)."""
    _target(host, cluster)
    if cluster is not None:
        _on_cluster(cluster, "DELETE")
        say(f"cluster {cluster} no longer accepts replication")
        return
    assert host is not None
    with_fleet(lambda fleet: fleet.client(host).delete("/v1/replica-server"))
    say(f"host {host} no longer accepts replication")
