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
) -> None:
    """Create and start lab hosts host-1..host-N (idempotent)."""
    from ferry.guest.build import default_cache_dir, ensure_guest

    lab = _lab(directory)
    with err.status("bringing the lab up") as status:
        lab.up(hosts, progress=lambda msg: status.update(msg))
        if not no_guest:
            status.update("building the test guest (first time only)")
            ensure_guest(default_cache_dir(), progress=lambda msg: status.update(msg))
    say(f"lab at {lab.root}: {hosts} host(s) running")
    _print_status(lab, as_json=False)


def _print_status(lab: Lab, *, as_json: bool) -> None:
    from ferry.host.config import load_host_config

    rows = []
    for host in lab.hosts():
        address, port = load_host_config(host.config_path).address
        pid = host.pid()
        rows.append({"name": host.name, "url": f"https://{address}:{port}",
                     "pid": pid, "running": pid is not None})  # fmt: skip
    if as_json:
        print_json({"dir": str(lab.root), "hosts": rows})
    else:
        print_table(["NAME", "URL", "PID", "RUNNING"],
                    [[r["name"], r["url"], r["pid"], "yes" if r["running"] else "no"]
                     for r in rows])  # fmt: skip


@app.command("status")
def status(directory: Path | None = DirOpt, as_json: bool = JsonOpt) -> None:
    """Show the lab's hosts and their agent pids."""
    _print_status(_lab(directory), as_json=as_json)


@app.command("down")
def down(directory: Path | None = DirOpt) -> None:
    """Stop every lab agent and every VM they run."""
    lab = _lab(directory)
    with err.status("bringing the lab down") as status:
        lab.down(progress=lambda msg: status.update(msg))
    say(f"lab at {lab.root} is down; nothing left running")
