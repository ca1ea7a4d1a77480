"""``ferry host ...``: the hosts this client knows."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ferry.cli.output import err, print_json, print_table, say
from ferry.cli.vm_cmd import JsonOpt, with_fleet
from ferry.core.units import format_size
from ferry.errors import FerryError, InvalidInputError

if TYPE_CHECKING:
    from ferry.client.fleet import Fleet

app = typer.Typer(help="Hosts: list, show, add, remove.", no_args_is_help=True)

_LIST_KEYS = ("name", "url", "version", "functional_level", "accelerator", "vms")


@app.command("list")
def list_hosts(as_json: bool = JsonOpt) -> None:
    """List known hosts and what they report (unreachable ones say so)."""

    async def run(fleet: Fleet) -> list[dict[str, Any]]:
        rows = []
        for name, result in (await fleet.each("/v1/host")).items():
            if isinstance(result, FerryError):
                entry = fleet.settings.host(name)
                rows.append({"name": name, "url": entry.url, "version": None,
                             "functional_level": None, "accelerator": None, "vms": None,
                             "error": str(result)})  # fmt: skip
            else:
                rows.append({key: result[key] for key in _LIST_KEYS})
        return rows

    rows = with_fleet(run)
    if as_json:
        print_json(rows)
        return
    print_table(
        ["NAME", "URL", "VERSION", "LEVEL", "ACCEL", "VMS"],
        [[row[key] for key in _LIST_KEYS] for row in rows],
    )
    for row in rows:
        if "error" in row:
            err.print(f"ferry: warning: {row['error']}", markup=False)


@app.command("show")
def show_host(host: str, as_json: bool = JsonOpt) -> None:
    """Show one host's facts."""
    facts: dict[str, Any] = with_fleet(lambda fleet: fleet.client(host).get("/v1/host"))
    if as_json:
        print_json(facts)
        return
    low, high = facts["supported_config_versions"]
    for label, value in [
        ("name", facts["name"]), ("url", facts["url"]), ("version", facts["version"]),
        ("functional level", facts["functional_level"]),
        ("config versions", f"{low}..{high}"), ("accelerator", facts["accelerator"]),
        ("qemu", facts["qemu_version"]), ("memory", format_size(facts["memory"])),
        ("cpus", facts["cpus"]), ("vms", f"{facts['vms']} ({facts['running_vms']} running)"),
        ("data dir", facts["data_dir"]),
        ("cpu models", _cpu_summary(facts.get("cpu_models", []))),
        ("firmware", ", ".join(facts.get("firmware", ["bios"]))),
    ]:  # fmt: skip
        say(f"{label:>17}: {value}")
    for net in facts.get("networks", []):
        say(f"{'network':>17}: {_network_line(net)}")


def _network_line(net: dict[str, Any]) -> str:
    where = f" in namespace {net['netns']}" if net.get("netns") else ""
    missing = "" if net["exists"] else " (MISSING: the bridge does not exist)"
    return f"{net['name']} -> bridge {net['bridge']}{where}{missing}"


def _cpu_summary(models: list[dict[str, Any]]) -> str:
    """How many CPU models the host runs (--json lists each with its missing features)."""
    if not models:
        return "not known"
    runnable = sum(bool(m["runnable"]) for m in models)
    narrowed = "" if all(m["allowed"] for m in models) else ", narrowed by host.toml"
    return f"{runnable} of {len(models)} runnable{narrowed} (--json lists them)"


@app.command("add")
def add_host(
    name: str,
    url: str,
    server_name: str | None = typer.Option(
        None, "--server-name", help="Name in the host's certificate (default: NAME)."
    ),
    admin_tls: Path | None = typer.Option(
        None, "--admin-tls", help="Dir with ca-cert.pem, client-cert.pem, client-key.pem."
    ),
) -> None:
    """Register a host so commands can reach it."""
    from ferry.client.settings import HostEntry, load_settings, save_settings
    from ferry.core.spec import check_name

    check_name(name, what="host name")
    if not url.startswith("https://"):
        raise InvalidInputError(f"host URL {url!r} must start with https://")
    settings = load_settings()
    settings.hosts[name] = HostEntry(url=url, server_name=server_name or name)
    if admin_tls is not None:
        settings.admin_tls_dir = admin_tls.resolve()
    path = save_settings(settings)
    say(f"added host {name} ({url}) to {path}")


@app.command("remove")
def remove_host(name: str) -> None:
    """Forget a host (its agent and VMs are not touched)."""
    from ferry.client.settings import load_settings, save_settings

    settings = load_settings()
    settings.host(name)
    del settings.hosts[name]
    save_settings(settings)
    say(f"removed host {name}")


network_app = typer.Typer(
    help="Host networks: names for Linux bridges that VMs' NICs join.", no_args_is_help=True
)
app.add_typer(network_app, name="network")


@network_app.command("add")
def add_network(
    name: str = typer.Argument(..., help="The network's name, as VMs' --nic names it."),
    bridge: str = typer.Option(..., "--bridge", help="The Linux bridge (it must exist)."),
    host: str = typer.Option(..., "--host", "-H", help="The host the bridge is on."),
    netns: str | None = typer.Option(
        None, "--netns", help="The bridge is inside this network namespace (taps move there)."
    ),
) -> None:
    """Name a bridge of HOST as network NAME (VMs name networks, never bridges)."""
    body = {"name": name, "bridge": bridge, "netns": netns}
    with_fleet(lambda fleet: fleet.client(host).post("/v1/networks", body))
    where = f" in namespace {netns}" if netns else ""
    say(f"host {host} has network {name} on bridge {bridge}{where}")


@network_app.command("list")
def list_networks(
    host: str | None = typer.Option(None, "--host", "-H", help="Only this host."),
    as_json: bool = JsonOpt,
) -> None:
    """List host networks per host, and whether each bridge exists."""
    results = with_fleet(lambda fleet: fleet.each("/v1/networks", host))
    rows = [{"host": name, **net} for name, result in results.items()
            if not isinstance(result, FerryError) for net in result]  # fmt: skip
    if as_json:
        print_json(rows)
    else:
        print_table(["HOST", "NETWORK", "BRIDGE", "NETNS", "EXISTS", "FROM"],
                    [[r["host"], r["name"], r["bridge"], r["netns"] or "-",
                      "yes" if r["exists"] else "NO", r["source"]] for r in rows])  # fmt: skip
    for name, result in results.items():
        if isinstance(result, FerryError):
            err.print(f"ferry: warning: {name}: {result}", markup=False)


@network_app.command("remove")
def remove_network(
    name: str = typer.Argument(..., help="The network to forget."),
    host: str = typer.Option(..., "--host", "-H", help="The host it is on."),
) -> None:
    """Forget a host network (refused while a VM of the host has a NIC on it; the bridge stays)."""
    with_fleet(lambda fleet: fleet.client(host).delete(f"/v1/networks/{name}"))
    say(f"host {host} no longer has network {name}")


volume_app = typer.Typer(help="Shared volumes: dirs several hosts see.", no_args_is_help=True)
app.add_typer(volume_app, name="volume")


@volume_app.command("add")
def add_volume(
    name: str,
    path: str,
    host: str = typer.Option(..., "--host", "-H", help="The host that sees PATH."),
) -> None:
    """Register a shared volume (a dir other hosts see too) on a host."""
    with_fleet(lambda fleet: fleet.client(host).post("/v1/volumes", {"name": name, "path": path}))
    say(f"host {host} has volume {name} at {path}")


@volume_app.command("list")
def list_volumes(
    host: str | None = typer.Option(None, "--host", "-H"), as_json: bool = JsonOpt
) -> None:
    """List shared volumes per host."""
    results = with_fleet(lambda fleet: fleet.each("/v1/volumes", host))
    rows = [{"host": name, "name": vol, "path": path}
            for name, result in results.items() if not isinstance(result, FerryError)
            for vol, path in result.items()]  # fmt: skip
    if as_json:
        print_json(rows)
    else:
        print_table(["HOST", "VOLUME", "PATH"], [[r["host"], r["name"], r["path"]] for r in rows])


@volume_app.command("remove")
def remove_volume(name: str, host: str = typer.Option(..., "--host", "-H")) -> None:
    """Forget a shared volume on a host (files stay)."""
    with_fleet(lambda fleet: fleet.client(host).delete(f"/v1/volumes/{name}"))
    say(f"host {host} no longer has volume {name}")


@app.command("upgrade-check")
def upgrade_check(host: str, as_json: bool = JsonOpt) -> None:
    """Say what upgrading HOST to this ferry will do (nothing is changed)."""
    from ferry import __version__
    from ferry.core.versions import DATA_SCHEMA_VERSION

    facts: dict[str, Any] = with_fleet(
        lambda fleet: fleet.client(host).get("/v1/host/upgrade-check")
    )
    steps = []
    current, new = facts["schema_version"], DATA_SCHEMA_VERSION
    if new > current:
        steps.append(f"the new agent migrates the data dir from schema {current} to {new} on "
                     "start (forward only: the old ferry refuses it afterwards)")  # fmt: skip
    elif new < current:
        steps.append(f"REFUSED: this ferry ({__version__}, schema {new}) is older than the "
                     f"host's data dir (schema {current}); its agent would not start")  # fmt: skip
    else:
        steps.append(f"the data dir stays at schema {current}: nothing to migrate")
    running = facts["running_vms"]
    steps.append(f"{len(running)} running VM(s) keep running: QEMU runs apart from the agent; "
                 "stop the agent, install, start it, and it re-attaches")  # fmt: skip
    if facts["outdated_qemu_vms"]:
        names = ", ".join(facts["outdated_qemu_vms"])
        steps.append(f"VMs {names} run a QEMU binary replaced on disk: "
                     f"'ferry host refresh-vms {host}' moves them to the new one live")  # fmt: skip
    report = {**facts, "new_version": __version__, "new_schema_version": new, "steps": steps,
              "ok": new >= current}  # fmt: skip
    if as_json:
        print_json(report)
        return
    say(f"host {host}: ferry {facts['version']} (schema {current}) -> {__version__} (schema {new})")
    for step in steps:
        say(f"  - {step}")


@app.command("refresh-vms")
def refresh_vms(host: str, as_json: bool = JsonOpt) -> None:
    """Move every running VM of HOST to a fresh QEMU process (after a QEMU upgrade)."""
    with err.status(f"refreshing the VMs of {host}"):
        report: dict[str, Any] = with_fleet(
            lambda fleet: fleet.client(host).post("/v1/host/refresh-vms")
        )
    if as_json:
        print_json(report)
        return
    for result in report["results"]:
        if "error" in result:
            err.print(f"ferry: error: {result['vm']}: {result['error']}", markup=False)
        else:
            say(f"VM {result['vm']}: QEMU pid {result['old_pid']} -> {result['pid']}, "
                f"{result['downtime_ms']} ms downtime")  # fmt: skip
    if any("error" in r for r in report["results"]):
        raise FerryError(f"some VMs of {host} stay on their old QEMU (see above)")
