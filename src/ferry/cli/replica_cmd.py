"""``ferry replica-server ...``: let a host receive replication from allowed primaries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import typer

from ferry.cli.output import print_json, print_table, say
from ferry.cli.vm_cmd import JsonOpt, with_fleet
from ferry.errors import InvalidInputError

app = typer.Typer(help="Replica server settings of a host.", no_args_is_help=True)

HostOpt = typer.Option(..., "--host", "-H", help="The host.")


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
    host: str = HostOpt,
) -> None:
    """Accept replication: --storage DIR [--allow PATTERN [--storage DIR] [--trust-group G]]...
    [--allow-any]. Patterns match the primary's host name (shell style: host-*)."""
    body = parse_enable_args(ctx.args)
    settings = with_fleet(lambda fleet: fleet.client(host).call("PUT", "/v1/replica-server",
                                                                body=body))  # fmt: skip
    _show(settings, host, as_json=False)


@app.command("show")
def show(host: str = HostOpt, as_json: bool = JsonOpt) -> None:
    """Show a host's replica server settings."""
    settings = with_fleet(lambda fleet: fleet.client(host).get("/v1/replica-server"))
    _show(settings, host, as_json)


@app.command("disable")
def disable(host: str = HostOpt) -> None:
    """Stop accepting replication (the settings are kept for a later enable)."""
    with_fleet(lambda fleet: fleet.client(host).delete("/v1/replica-server"))
    say(f"host {host} no longer accepts replication")
