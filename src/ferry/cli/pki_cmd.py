"""``ferry pki ...``: the certificates ferry hosts and admins use."""

from __future__ import annotations

from pathlib import Path

import typer

from ferry.cli.output import err, print_json, print_table, say
from ferry.cli.vm_cmd import JsonOpt, with_fleet

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
                    "role": info.role, "thumbprint": info.thumbprint, "serial": info.serial,
                    "not_after": info.not_after.isoformat(),
                    "dns_names": list(info.dns_names), "ips": list(info.ips)})  # fmt: skip
    else:
        print(info.thumbprint)


def _pushed_lines(pushed: dict[str, str | None], what: str) -> None:
    for host, error in sorted(pushed.items()):
        if error is None:
            say(f"  {what} on {host}")
        else:
            err.print(
                f"ferry: warning: {host} did not take the deny-list: {error}; "
                "run 'ferry pki revocations --ca CA --push' once it answers",
                markup=False,
            )


@app.command("renew")
def renew(
    host: str = typer.Option(..., "--host", "-H", help="The host whose certificate to renew."),
    ca: Path = CaOpt,
    force: bool = typer.Option(
        False,
        "--force",
        help="Renew even if a partner cannot be told (pin it there by hand afterwards).",
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Renew a host's certificate in place: no restart, VMs keep running, partners' pins follow.

    The new certificate keeps the host's name and addresses; the agent tells
    every replication partner its new thumbprint over the old channel, then
    switches; the old certificate is revoked on every known agent.
    """
    from ferry.client.pki import renew as run

    done = with_fleet(lambda fleet: run(fleet, ca, host, force=force))
    if as_json:
        print_json(done)
        return
    say(f"renewed host {host}: {done['old']['thumbprint']} -> {done['new']['thumbprint']} "
        f"(serial {done['new']['serial']}, until {done['new']['not_after'][:10]})")  # fmt: skip
    for partner in done["partners"]:
        if partner["error"] is None:
            say(f"  {partner['host']}: {partner['pins_updated']} pin(s) follow")
        else:
            err.print(f"ferry: warning: {partner['host']} was not told: {partner['error']}; run "
                      f"'ferry replication set VM --certificate-thumbprint "
                      f"{done['new']['thumbprint']}' there", markup=False)  # fmt: skip
    _pushed_lines(done["old_revoked_on"], f"old certificate {done['old']['serial']} revoked")


@app.command("revoke")
def revoke(
    ca: Path = CaOpt,
    host: str | None = typer.Option(
        None, "--host", "-H", help="Revoke the certificate this host's agent presents."
    ),
    serial: str | None = typer.Option(
        None, "--serial", help="Revoke the certificate with this serial (hex)."
    ),
    reason: str = typer.Option("", "--reason", help="Why (kept in the list)."),
    as_json: bool = JsonOpt,
) -> None:
    """Revoke a certificate at once on every known agent (the deny-list in the CA dir)."""
    from ferry.client.pki import revoke as run

    done = with_fleet(lambda fleet: run(fleet, ca, host=host, serial=serial, reason=reason))
    if as_json:
        print_json(done)
        return
    entry = done["revoked"]
    owner = f" (host {entry['host']})" if entry["host"] else ""
    say(f"revoked serial {entry['serial']}{owner}" + ("" if done["new"] else " (already listed)"))
    _pushed_lines(done["pushed"], "refused")


@app.command("revocations")
def revocations(
    ca: Path = CaOpt,
    push: bool = typer.Option(False, "--push", help="Push the list to every known agent again."),
    as_json: bool = JsonOpt,
) -> None:
    """List the revoked certificates (the CA dir's deny-list)."""
    from ferry.client.pki import ca_list, entry_json
    from ferry.client.pki import push as run

    listed = ca_list(ca)
    pushed = with_fleet(lambda fleet: run(fleet, listed)) if push else None
    rows = [entry_json(e) for e in listed.entries]
    if as_json:
        print_json({"revoked": rows, "pushed": pushed} if push else {"revoked": rows})
        return
    print_table(["SERIAL", "HOST", "REASON"], [[r["serial"], r["host"], r["reason"]] for r in rows])
    if pushed is not None:
        _pushed_lines(pushed, "list pushed")
