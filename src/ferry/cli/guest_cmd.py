"""``ferry guest ...``: the project's tiny test guest."""

from __future__ import annotations

from pathlib import Path

import typer

from ferry.cli.output import err, print_json, say
from ferry.cli.vm_cmd import JsonOpt

app = typer.Typer(help="The test guest: build it, read its records.", no_args_is_help=True)


@app.command("build")
def build(
    force: bool = typer.Option(False, "--force", help="Rebuild even if cached."),
    cache: Path | None = typer.Option(None, "--cache", help="Cache dir."),
) -> None:
    """Build the test guest (kernel + initramfs) from Debian packages."""
    from ferry.guest.build import build_guest, default_cache_dir

    with err.status("building the test guest") as status:
        guest = build_guest(cache or default_cache_dir(), force=force,
                            progress=lambda msg: status.update(msg))  # fmt: skip
    say(f"test guest: kernel {guest.kernel}, initrd {guest.initrd}")


@app.command("records")
def records(image: Path, as_json: bool = JsonOpt) -> None:
    """Read the test guest's workload records from a disk image."""
    from ferry.guest.records import read_records

    scan = read_records(image)
    if as_json:
        print_json(scan.to_json())
    else:
        say(f"last seq {scan.last_seq}, {scan.count} records, {scan.corrupt} corrupt")
