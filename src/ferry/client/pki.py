"""The admin's side of ``ferry pki renew`` and ``ferry pki revoke``: it holds the CA.

Renewal: read the certificate the host's agent presents, issue a new one for
the same name and addresses from the CA dir, hand it to the agent (which
tells its partners over the old channel and switches in place, see
:mod:`ferry.host.certificates`), then revoke the old certificate's serial.

Revocation: the master deny-list is ``revoked.json`` in the CA dir; every
change is merged there first and then the whole list is pushed to every
known agent (``POST /v1/revocations``), so an agent that missed a push
catches up with the next one (``ferry pki revocations --push``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ferry.adapters.pki import host_cert_pems
from ferry.adapters.pki.revocation import REVOKED_FILE, RevocationList, Revoked, check_serial
from ferry.client.fleet import Fleet
from ferry.errors import FerryError, InvalidInputError


def ca_list(ca_dir: Path) -> RevocationList:
    if not (ca_dir / "ca-cert.pem").is_file():
        raise InvalidInputError(f"{ca_dir} holds no CA (ca-cert.pem); pass the CA dir with --ca")
    return RevocationList(ca_dir / REVOKED_FILE)


def entry_json(entry: Revoked) -> dict[str, Any]:
    return {"serial": entry.serial, "host": entry.host, "thumbprint": entry.thumbprint,
            "reason": entry.reason, "revoked_at": entry.revoked_at}  # fmt: skip


async def push(fleet: Fleet, revoked: RevocationList) -> dict[str, str | None]:
    """Send the whole list to every known agent: host -> None, or why it failed."""
    body = {"revoked": [entry_json(e) for e in revoked.entries]}

    async def one(host: str) -> str | None:
        try:
            await fleet.client(host).post("/v1/revocations", body)
        except FerryError as exc:
            return str(exc)
        return None

    hosts = fleet.host_names()
    results = await asyncio.gather(*(one(h) for h in hosts))
    return dict(zip(hosts, results, strict=True))


async def revoke(fleet: Fleet, ca_dir: Path, *, host: str | None, serial: str | None,
                 reason: str) -> dict[str, Any]:  # fmt: skip
    """Revoke host ``host``'s current certificate, or the one with ``serial``."""
    if (host is None) == (serial is None):
        raise InvalidInputError("name the certificate: --host HOST or --serial SERIAL")
    revoked = ca_list(ca_dir)
    if host is not None:
        cert = await fleet.client(host).get("/v1/host/certificate")
        entry = Revoked(check_serial(cert["serial"]), host, cert["thumbprint"], reason)
    else:
        entry = Revoked(check_serial(serial or ""), "", "", reason)
    added = revoked.merge([entry])
    pushed = await push(fleet, revoked)
    return {"revoked": entry_json(revoked.get(entry.serial) or entry), "new": bool(added),
            "pushed": pushed}  # fmt: skip


async def renew(fleet: Fleet, ca_dir: Path, host: str, *, force: bool,
                add_dns: Sequence[str] = ()) -> dict[str, Any]:  # fmt: skip
    """Renew ``host``'s certificate in place and retire the old one; ``add_dns``: names
    the new certificate carries besides the old one's (a replica cluster's name)."""
    revoked = ca_list(ca_dir)
    client = fleet.client(host)
    cert = await client.get("/v1/host/certificate")
    if cert["common_name"] != host:
        raise InvalidInputError(f"the agent at {client.url} presents a certificate for "
                                f"{cert['common_name']!r}, not {host!r}")  # fmt: skip
    extra_dns = [name for name in cert["dns_names"] if name != host]
    extra_dns += [name for name in add_dns if name not in extra_dns]
    pems = await asyncio.to_thread(host_cert_pems, ca_dir, host, dns_names=extra_dns,
                                   ips=cert["ips"])  # fmt: skip
    done: dict[str, Any] = await client.post(
        "/v1/host/certificate",
        {"cert_pem": pems.cert_pem.decode(), "key_pem": pems.key_pem.decode(), "force": force},
    )
    old = done["old"]
    revoked.merge(
        [
            Revoked(
                check_serial(old["serial"]),
                host,
                old["thumbprint"],
                f"superseded by {done['new']['serial']} (ferry pki renew)",
            )
        ]
    )
    done["old_revoked_on"] = await push(fleet, revoked)
    return done


async def cluster_names_missing(fleet: Fleet, nodes: Sequence[str], name: str) -> list[str]:
    """The nodes whose certificate does not carry DNS name ``name`` (nothing changes)."""
    missing = []
    for node in nodes:
        cert = await fleet.client(node).get("/v1/host/certificate")
        if name not in cert["dns_names"]:
            missing.append(node)
    return missing


async def add_cluster_name(fleet: Fleet, ca_dir: Path, nodes: Sequence[str],
                           name: str) -> list[dict[str, Any]]:  # fmt: skip
    """Re-issue each node's certificate with DNS name ``name`` added (the replica broker's
    cluster name, ``C.cluster.ferry``): a renewal in place, partners' pins follow."""
    return [await renew(fleet, ca_dir, node, force=False, add_dns=[name]) for node in nodes]
