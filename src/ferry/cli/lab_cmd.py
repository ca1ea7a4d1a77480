"""``ferry lab ...``: several hosts on this machine, for trying ferry out."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ferry.cli.output import err, print_json, print_table, say
from ferry.cli.vm_cmd import JsonOpt

if TYPE_CHECKING:
    from ferry.lab import Lab

app = typer.Typer(help="A local lab of ferry hosts on loopback.", no_args_is_help=True)

DirOpt = typer.Option(None, "--dir", help="Lab dir (default: the last one, or $FERRY_HOME/lab).")


def _lab(directory: Path | None) -> Lab:
    from ferry.client.settings import ferry_home, load_settings
    from ferry.lab import Lab

    if directory is not None:
        return Lab(directory)
    return Lab(load_settings().lab_dir or ferry_home() / "lab")


@app.command("up")
def up(
    hosts: int = typer.Option(2, "--hosts", "-n", help="How many hosts."),
    directory: Path | None = DirOpt,
    no_guest: bool = typer.Option(False, "--no-guest", help="Do not build the test guest now."),
    cluster: list[str] = typer.Option(
        [],
        "--cluster",
        metavar="NAME[=HOST,...]",
        help="Make cluster NAME of those hosts (all if none named), "
        "with one lab etcd and volume csv1; repeat for more clusters.",
    ),
    lease_ttl: int | None = typer.Option(
        None,
        "--lease-ttl",
        metavar="SECONDS",
        help="Cluster lease TTL in seconds for every host (default 10).",
    ),
) -> None:
    """Create and start lab hosts host-1..host-N (idempotent), and the clusters asked for."""
    from ferry.guest.build import default_cache_dir, ensure_guest

    clusters = _parse_clusters(cluster)
    lab = _lab(directory)
    with err.status("bringing the lab up") as status:
        lab.up(hosts, progress=lambda msg: status.update(msg), clusters=clusters,
               lease_ttl_s=lease_ttl)  # fmt: skip
        if not no_guest:
            status.update("building the test guest (first time only)")
            ensure_guest(default_cache_dir(), progress=lambda msg: status.update(msg))
    made = f"; cluster(s) {', '.join(clusters)} on etcd {lab.etcd.url}" if clusters else ""
    say(f"lab at {lab.root}: {hosts} host(s) running{made}")
    _print_status(lab, as_json=False)


def _parse_clusters(specs: list[str]) -> dict[str, list[str]]:
    """``["c1", "c2=host-1,host-2"]`` -> ``{"c1": [], "c2": ["host-1", "host-2"]}``."""
    from ferry.errors import InvalidInputError

    clusters: dict[str, list[str]] = {}
    for spec in specs:
        name, _, members = spec.partition("=")
        hosts = [h.strip() for h in members.split(",") if h.strip()]
        if not name or name in clusters or ("=" in spec and not hosts):
            raise InvalidInputError(
                f"--cluster {spec!r}: use NAME or NAME=HOST,HOST..., each NAME once"
            )
        clusters[name] = hosts
    return clusters


def _print_status(lab: Lab, *, as_json: bool) -> None:
    from ferry.host.config import load_host_config

    rows = []
    for host in lab.hosts():
        address, port = load_host_config(host.config_path).address
        pid = host.pid()
        rows.append({"name": host.name, "url": f"https://{address}:{port}",
                     "pid": pid, "running": pid is not None})  # fmt: skip
    etcd = None
    if lab.etcd.configured:
        etcd_pid = lab.etcd.pid()
        etcd = {"url": lab.etcd.url, "pid": etcd_pid, "running": etcd_pid is not None}
    from ferry.adapters import netdev
    from ferry.lab import LAB_NETWORK

    network = {"name": LAB_NETWORK, "netns": lab.netns, "bridge": lab.bridge,
               "up": netdev.netns_exists(lab.netns)}  # fmt: skip
    if as_json:
        print_json({"dir": str(lab.root), "hosts": rows, "etcd": etcd, "network": network})
    else:
        print_table(["NAME", "URL", "PID", "RUNNING"],
                    [[r["name"], r["url"], r["pid"], "yes" if r["running"] else "no"]
                     for r in rows]
                    + ([["etcd", etcd["url"], etcd["pid"], "yes" if etcd["running"] else "no"]]
                       if etcd else []))  # fmt: skip
        if network["up"]:
            say(f"network {LAB_NETWORK}: bridge {lab.bridge} in namespace {lab.netns} "
                "('ferry lab exec -- CMD' runs there)")  # fmt: skip


@app.command("status")
def status(directory: Path | None = DirOpt, as_json: bool = JsonOpt) -> None:
    """Show the lab's hosts and their agent pids, and the lab's etcd if it has one."""
    _print_status(_lab(directory), as_json=as_json)


@app.command("crash")
def crash(
    host: str = typer.Argument(..., help="The lab host to fail, e.g. host-1."),
    directory: Path | None = DirOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Power loss of one lab host: SIGKILL its agent, fence guard and QEMUs.

    Nothing is stopped cleanly, as when a real host dies; a cluster restarts
    its VMs on the other nodes once its lease expires. 'ferry lab up' brings
    the host back.
    """
    lab = _lab(directory)
    killed = lab.crash(host)
    if as_json:
        print_json({"host": host, "killed": killed})
        return
    say(f"{host} crashed: " + (", ".join(killed) if killed else "nothing was running"))


@app.command("down")
def down(directory: Path | None = DirOpt) -> None:
    """Stop every lab agent, every VM they run, their fence guards and the lab's etcd."""
    lab = _lab(directory)
    with err.status("bringing the lab down") as status:
        lab.down(progress=lambda msg: status.update(msg))
    say(f"lab at {lab.root} is down; nothing left running")


@app.command("exec", context_settings={"ignore_unknown_options": True})
def exec_in_lab(
    command: list[str] = typer.Argument(
        ..., metavar="-- CMD [ARG...]", help="The command to run inside the lab network."
    ),
    directory: Path | None = DirOpt,
) -> None:
    """Run CMD inside the lab network's namespace (a peer on the lab guests' LAN).

    The lab's bridge there has 10.213.0.1/16; a test guest with a NIC on network
    'lab' has the address 'ferry vm show NAME --json' gives as nics[i].ip, and
    answers TCP echo on port 7. Exits with CMD's status.
    """
    code = _lab(directory).exec(command)
    if code:
        raise typer.Exit(code)
