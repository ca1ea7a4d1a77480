"""The client's half of ``ferry doctor``: ask every host, compare their clocks.

Each agent judges itself (``GET /v1/host/doctor``); only the client sees all
hosts, so it adds the clock check (each agent's time against the others',
round trip allowed for), a failed ``agent`` check for a host that does not
answer, and the expiry of the admin certificate it uses itself.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time

from ferry.adapters.pki import CLIENT_CERT, load_cert_info
from ferry.client.fleet import Fleet
from ferry.core import doctor
from ferry.core.doctor import Check, ClockSample
from ferry.errors import FerryError

CLIENT = "client"  # the host column of checks about this client


async def _ask(fleet: Fleet, host: str) -> tuple[list[Check], ClockSample | None]:
    before = time.time()
    try:
        reply = await fleet.client(host).get("/v1/host/doctor")
    except FerryError as exc:
        return [doctor.unreachable_check(host, str(exc))], None
    after = time.time()
    checks = [Check.from_json(raw) for raw in reply["checks"]]
    sent = float(reply["time"])
    received = float(reply.get("received", sent))
    return checks, ClockSample(before=before, received=received, sent=sent, after=after)


def _admin_cert(fleet: Fleet) -> Check:
    path = fleet.settings.tls_dir() / CLIENT_CERT
    remedy = "issue a new admin certificate ('ferry pki admin') into " + str(path.parent)
    now = dt.datetime.now(dt.UTC)
    try:
        info = load_cert_info(path)
    except FerryError as exc:
        check = doctor.cert_check("cert_admin", "admin certificate", None, now, remedy=remedy,
                                  error=str(exc))  # fmt: skip
    else:
        check = doctor.cert_check("cert_admin", "admin certificate", info.not_after, now,
                                  remedy=remedy)  # fmt: skip
    return Check(check.name, check.status, check.detail, check.remedy, CLIENT)


async def run_doctor(fleet: Fleet, only: str | None = None) -> list[Check]:
    """Every check of every host (or of ``only``), host by host, then the client's."""
    names = fleet.host_names(only)
    answers = await asyncio.gather(*(_ask(fleet, name) for name in names))
    samples = {name: sample for name, (_, sample) in zip(names, answers, strict=True)
               if sample is not None}  # fmt: skip
    clocks = {c.host: c for c in doctor.clock_checks(samples)}
    checks: list[Check] = []
    for name, (own, _) in zip(names, answers, strict=True):
        checks += own
        if name in clocks:
            checks.append(clocks[name])
    checks.append(_admin_cert(fleet))
    return checks
