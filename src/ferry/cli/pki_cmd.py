"""``ferry pki ...``: the certificates ferry hosts and admins use."""

from __future__ import annotations

from pathlib import Path

import typer

from ferry.cli.output import print_json, say
from ferry.cli.vm_cmd import JsonOpt

app = typer.Typer(help="Certificate authority and certificates.", no_args_is_help=True)

CaOpt = typer.Option(..., "--ca", help="The CA dir (ca-cert.pem, ca-key.pem).")


@app.command("init-ca")
def init_ca(
    directory: Path = typer.Argument(..., help="Dir for the new CA."),
    name: str = typer.Option("ferry-ca", "--name", help="The CA's common name."),
) -> None:
    """Create a certificate authority."""
    from ferry.adapters import pki

    path = pki.create_ca(directory, name=name)
    say(f"created CA {name} at {path}")


@app.command("host")
def host_cert(
    name: str = typer.Argument(..., help="The host's name (also its DNS name)."),
    ca: Path = CaOpt,
    out: Path = typer.Option(..., "--out", help="Dir for the host's TLS files."),
    dns: list[str] = typer.Option([], "--dns", help="Another DNS name (repeat)."),
    ip: list[str] = typer.Option([], "--ip", help="An IP address (repeat)."),
) -> None:
    """Issue a host certificate (server + client), laid out for QEMU's tls-creds-x509."""
    from ferry.adapters import pki

    info = pki.issue_host_cert(ca, out, name, dns_names=dns, ips=ip)
    say(f"issued host certificate {info.subject} in {out} (sha256 {info.thumbprint})")


@app.command("admin")
def admin_cert(
    name: str = typer.Argument("admin", help="The admin's name."),
    ca: Path = CaOpt,
    out: Path = typer.Option(..., "--out", help="Dir for the admin's TLS files."),
) -> None:
    """Issue an admin client certificate for the CLI."""
    from ferry.adapters import pki

    info = pki.issue_admin_cert(ca, out, name)
    say(f"issued admin certificate {info.subject} in {out} (sha256 {info.thumbprint})")


@app.command("thumbprint")
def thumbprint(cert: Path, as_json: bool = JsonOpt) -> None:
    """Print a certificate's SHA-256 thumbprint (and, with --json, its details)."""
    from ferry.adapters import pki

    info = pki.load_cert_info(cert)
    if as_json:
        print_json({"subject": info.subject, "common_name": info.common_name,
                    "role": info.role, "thumbprint": info.thumbprint,
                    "not_after": info.not_after.isoformat(),
                    "dns_names": list(info.dns_names), "ips": list(info.ips)})  # fmt: skip
    else:
        print(info.thumbprint)
