"""The ``ferry`` command: entry point, global options and error handling.

Every failure is one line on stderr and a non-zero exit (1 for a ferry error,
2 for a usage error); ``--debug`` (or ``FERRY_DEBUG=1``) adds the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import typer
from typer._click.exceptions import NoArgsIsHelpError
from typer.exceptions import TyperException

from ferry import __version__
from ferry.cli import (
    cluster_cmd,
    doctor_cmd,
    failover_cmd,
    guest_cmd,
    host_cmd,
    job_cmd,
    lab_cmd,
    pki_cmd,
    plan_cmd,
    replica_cmd,
    replication_cmd,
    vm_cmd,
    web_cmd,
)
from ferry.cli.output import err
from ferry.errors import FerryError, InvalidInputError

app = typer.Typer(
    name="ferry",
    help="VM mobility and disaster recovery for KVM/QEMU hosts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(lab_cmd.app, name="lab")
app.add_typer(host_cmd.app, name="host")
app.add_typer(vm_cmd.app, name="vm")
app.add_typer(job_cmd.app, name="job")
app.add_typer(replica_cmd.app, name="replica-server")
app.add_typer(replication_cmd.app, name="replication")
app.add_typer(failover_cmd.app, name="failover")
app.add_typer(cluster_cmd.app, name="cluster")
app.add_typer(guest_cmd.app, name="guest")
app.add_typer(pki_cmd.app, name="pki")
app.add_typer(plan_cmd.app, name="plan")
app.command("web")(web_cmd.web)
app.command("doctor")(doctor_cmd.doctor)

_debug = {"on": os.environ.get("FERRY_DEBUG") == "1"}


def _version(value: bool) -> None:
    if value:
        print(f"ferry {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    if debug:
        _debug["on"] = True


@app.command("agent")
def agent(
    config: Path | None = typer.Option(None, "--config", "-c", help="The host's host.toml."),
    log_format: str = typer.Option(
        "text",
        "--log-format",
        envvar="FERRY_LOG_FORMAT",
        metavar="text|json",
        help="Log lines as text, or as one JSON event per line (ts, level, logger, msg, "
        "and vm, job, peer when known).",
    ),
    print_unit: bool = typer.Option(
        False, "--print-unit", help="Print the systemd unit for the agent and exit."
    ),
) -> None:
    """Run this host's agent in the foreground (HTTPS API, owns the VMs)."""
    if print_unit:
        from ferry.packaging import agent_unit

        print(agent_unit(), end="")
        return
    if log_format not in ("text", "json"):
        raise InvalidInputError(f"--log-format must be text or json, not {log_format!r}")
    if config is None:
        raise InvalidInputError("say which host.toml to run: ferry agent --config PATH")
    from ferry.agent import run_agent

    run_agent(config, "json" if log_format == "json" else "text")


def main(argv: list[str] | None = None) -> None:
    try:
        result = app(args=argv, standalone_mode=False)
    except FerryError as exc:
        if _debug["on"]:
            traceback.print_exc()
        err.print(f"ferry: error: {exc}", markup=False)
        sys.exit(1)
    except NoArgsIsHelpError as exc:
        print(exc.format_message(), file=sys.stderr)
        sys.exit(2)
    except TyperException as exc:
        # Usage errors: one line, like every other error.
        err.print(f"ferry: error: {exc.format_message()}", markup=False)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err.print("ferry: interrupted", markup=False)
        sys.exit(130)
    except Exception as exc:
        if _debug["on"]:
            traceback.print_exc()
        err.print(
            f"ferry: internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)",
            markup=False,
        )
        sys.exit(70)
    sys.exit(result if isinstance(result, int) else 0)
