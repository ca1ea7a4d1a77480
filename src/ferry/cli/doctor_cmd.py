"""``ferry doctor``: is every host fit to run, move and replicate VMs?"""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from ferry.cli.output import out, print_json
from ferry.cli.vm_cmd import JsonOpt, with_fleet

if TYPE_CHECKING:
    from ferry.client.fleet import Fleet
    from ferry.core.doctor import Check


def doctor(
    host: str | None = typer.Option(None, "--host", help="Check only this host."),
    as_json: bool = JsonOpt,
) -> None:
    """Check QEMU, KVM, certificates, clocks, free space, bridges and etcd on every host.

    One line per check: ok, warn or fail, with what to do. Exits non-zero when a check failed.
    """
    from ferry.client.doctor import run_doctor
    from ferry.core.doctor import failed

    async def run(fleet: Fleet) -> list[Check]:
        return await run_doctor(fleet, host)

    checks = with_fleet(run)
    if as_json:
        print_json({"checks": [c.to_json() for c in checks]})
    else:
        width = max((len(c.host) for c in checks), default=0)
        for c in checks:
            remedy = f" -> {c.remedy}" if c.remedy else ""
            out.print(
                f"{c.status.value:<4} {c.host:<{width}} {c.name}: {c.detail}{remedy}", markup=False
            )
    if failed(checks):
        raise typer.Exit(1)
