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


@app.command("boot-image")
def boot_image(
    target: Path = typer.Argument(..., help="The raw disk image to write (replaced whole)."),
    tag: str = typer.Option("ferry", "--tag", help="The guest prints 'booted tag=TAG'."),
    cache: Path | None = typer.Option(None, "--cache", help="Cache dir of the test guest."),
) -> None:
    """Write a disk image that boots the test guest through BIOS or UEFI (vm create --image)."""
    from ferry.guest.bootable import build_boot_image
    from ferry.guest.build import default_cache_dir, ensure_guest

    with err.status("building a bootable test guest image"):
        guest = ensure_guest(cache or default_cache_dir())
        build_boot_image(target, guest, tag=tag)
    say(f"bootable test guest image: {target} (BIOS and UEFI)")


@app.command("records")
def records(
    images: list[Path] = typer.Argument(
        ..., help="The VM's disk images, in its disk order (any format qemu-img reads)."
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Read the test guest's records from each disk; say whether they are one instant."""
    from ferry.guest.records import read_disk_set

    found = read_disk_set(images)
    if as_json:
        print_json(found.to_json())
        return
    for image, scan in zip(found.images, found.scans, strict=True):
        prefix = f"{image}: " if len(found.images) > 1 else ""
        say(f"{prefix}last seq {scan.last_seq}, {scan.count} records, {scan.corrupt} corrupt")
    if len(found.images) > 1:
        say(f"{found.verdict}" + (f": {found.reason}" if found.reason else ": one instant"))
