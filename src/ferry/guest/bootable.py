"""A bootable disk image of the test guest, for BIOS and UEFI, made without loop devices.

The image is a FAT file system on the whole disk (no partition table),
written with mtools into a plain file:

- ``linux.efi`` and ``initrd.img``: the test guest's kernel (Debian's cloud
  kernel has an EFI stub, so the same file is an EFI program) and initramfs;
- for BIOS, ``syslinux --install`` on the image file puts syslinux's boot
  sector and ``ldlinux.sys`` in it (syslinux writes the file system with
  mtools, no mount), and ``syslinux.cfg`` boots the kernel with its
  command line; SeaBIOS runs the boot sector of the boot disk;
- for UEFI, OVMF finds no ``EFI/BOOT/BOOTX64.EFI`` on the disk and falls
  back to its built-in shell, which runs ``startup.nsh``: it starts
  ``linux.efi`` with ``initrd=`` and the same command line.

The volume label ``FERRYBOOT`` marks the disk: the test guest leaves disks
with that label alone (it writes its records to every other disk). The
command line carries ``ferry.boot=TAG``, which the guest prints as
``ferry-guest booted tag=TAG``, so a test sees which image it booted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ferry.errors import GuestBuildError, InvalidInputError
from ferry.guest.build import GuestArtifacts

LABEL = "FERRYBOOT"
PACKAGES = "mtools syslinux syslinux-common"
_SLACK = 8 * 1024**2  # file system overhead and room to spare
_TAG_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def boot_append(guest: GuestArtifacts, tag: str) -> str:
    """The kernel command line the image boots with (the guest's own plus the tag)."""
    return f"{guest.append} ferry.boot={tag}"


def syslinux_cfg(append: str) -> str:
    return (
        "DEFAULT ferry\nPROMPT 0\nTIMEOUT 0\nLABEL ferry\n"
        f"  LINUX /linux.efi\n  INITRD /initrd.img\n  APPEND {append}\n"
    )


def startup_nsh(append: str) -> str:
    # The UEFI shell maps the first FAT file system it finds as fs0: (a VM's
    # other disks hold no file system the firmware reads).
    return f"fs0:\r\n\\linux.efi initrd=\\initrd.img {append}\r\n"


def build_boot_image(target: Path, guest: GuestArtifacts, *, tag: str = "ferry") -> Path:
    """Write a bootable raw disk image of ``guest`` to ``target`` (replaced whole)."""
    if not tag or not set(tag) <= _TAG_CHARS:
        raise InvalidInputError(f"boot image tag {tag!r}: use letters, digits, '-', '_' or '.'")
    for tool in ("mformat", "mcopy", "syslinux"):
        if shutil.which(tool) is None:
            raise GuestBuildError(
                f"cannot build a bootable disk image: {tool} is missing "
                f"(apt-get install -y {PACKAGES})"
            )
    if not target.parent.is_dir():
        raise InvalidInputError(f"cannot write {target}: {target.parent} is not a directory")
    append = boot_append(guest, tag)
    size = guest.kernel.stat().st_size + guest.initrd.stat().st_size + _SLACK
    size = -(-size // 1024**2) * 1024**2
    partial = target.with_name(f".{target.name}.partial")
    config_dir = target.with_name(f".{target.name}.files")
    partial.unlink(missing_ok=True)
    shutil.rmtree(config_dir, ignore_errors=True)
    config_dir.mkdir()
    try:
        (config_dir / "syslinux.cfg").write_text(syslinux_cfg(append))
        (config_dir / "startup.nsh").write_text(startup_nsh(append))
        with partial.open("wb") as image:
            image.truncate(size)
        img = str(partial)
        # 64 heads x 32 sectors: a geometry mformat accepts for any whole MiB.
        _run(["mformat", "-i", img, "-T", str(size // 512), "-h", "64", "-s", "32",
              "-v", LABEL, "::"])  # fmt: skip
        _run(["mcopy", "-i", img, str(guest.kernel), "::/linux.efi"])
        _run(["mcopy", "-i", img, str(guest.initrd), "::/initrd.img"])
        _run(["mcopy", "-i", img, str(config_dir / "syslinux.cfg"), "::/syslinux.cfg"])
        _run(["mcopy", "-i", img, str(config_dir / "startup.nsh"), "::/startup.nsh"])
        _run(["syslinux", "--install", img])
        with partial.open("rb+") as image:
            os.fsync(image.fileno())
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
        shutil.rmtree(config_dir, ignore_errors=True)
    return target


def _run(argv: list[str]) -> None:
    # MTOOLS_SKIP_CHECK: mtools refuses an image whose geometry it finds odd.
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    except OSError as exc:
        raise GuestBuildError(
            f"cannot run {argv[0]}: {exc}; apt-get install -y {PACKAGES}"
        ) from exc
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise GuestBuildError(f"building a bootable disk image: {argv[0]} failed: {last[0]}")
