"""Firmware for real: BIOS and UEFI boots from disk, disks in the order typed, --boot-disk,
and a UEFI variable the guest wrote surviving moves, export/import, replication, planned
and test failover.

The boot images are FAT images the test builds with mtools (ferry.guest.bootable): the
test guest's kernel and initramfs, syslinux for BIOS and a startup.nsh for OVMF's shell.
Under UEFI the guest adds one variable FerryBootN to its variable store per boot and
prints ``ferry-guest efi-boots=N``: N one higher after an operation and a fresh start
means the store the operation carried held the variable the guest wrote before it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LabEnv, lab_session, seqs

pytestmark = pytest.mark.integration

BOOTS = re.compile(r"ferry-guest efi-boots=(\d+)")
BOOT_TIMEOUT_S = 300  # OVMF and its shell under TCG on a loaded machine: about a minute


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, guest_cache: Path) -> Iterator[LabEnv]:
    """Two lab hosts; each accepts replication from the other."""
    with lab_session(tmp_path_factory.mktemp("lab")) as lab_env:
        lab_env.lab.up(2)
        replicas = tmp_path_factory.mktemp("replicas")
        for me, other in (("host-1", "host-2"), ("host-2", "host-1")):
            lab_env.cli("replica-server", "enable", "--host", me, "--storage",
                        str(replicas / me), "--allow", other)  # fmt: skip
        yield lab_env


@pytest.fixture(scope="module")
def images(env: LabEnv, guest_cache: Path) -> dict[str, str]:
    """Boot images A and B (their kernel command lines say ferry.boot=A / B) in image_dirs,
    written by ``ferry guest boot-image``."""
    made = {}
    for tag in ("A", "B"):
        path = env.lab.images_dir / f"boot-{tag}.img"
        env.cli("guest", "boot-image", str(path), "--tag", tag, "--cache", str(guest_cache))
        made[tag] = str(path)
    return made


def _console(env: LabEnv, name: str, host: str | None = None) -> str:
    return env.console(name, host)


def wait_up(env: LabEnv, name: str, host: str | None = None) -> str:
    """The console once the guest is up and wrote a record."""
    return env.wait_console(name, lambda t: "ferry-guest up" in t and len(seqs(t)) >= 1,
                            timeout=BOOT_TIMEOUT_S, host=host)  # fmt: skip


def efi_boots(text: str) -> int:
    found = BOOTS.findall(text)
    assert found, f"the guest printed no efi-boots line:\n{text[-1500:]}"
    return int(found[-1])


def restart(env: LabEnv, name: str, host: str) -> str:
    """Stop the VM cleanly (its variable store is then a file only) and start it again."""
    env.cli("vm", "stop", name, "--host", host)
    assert env.vm(name, host)["state"] == "off"
    env.cli("vm", "start", name, "--host", host)
    return wait_up(env, name, host)


def wait_for(probe: Any, done: Any, timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"gave up waiting; last: {value}"
        time.sleep(1)


def test_bios_boots_the_image_typed_first_and_disks_keep_their_order(
    env: LabEnv, images: dict[str, str]
) -> None:
    env.cli("vm", "create", "bios-first", "--host", "host-1", "--memory", "128M",
            "--image", images["A"], "--disk", "32M", "--start")  # fmt: skip
    try:
        vm = env.vm("bios-first")
        assert vm["firmware"] == "bios" and vm["kernel"] is None  # no kernel: SeaBIOS boots
        sizes = [d["size"] for d in vm["disks"]]
        assert sizes[1] == 32 * 1024**2 and sizes[0] != sizes[1]  # the image first, as typed
        text = wait_up(env, "bios-first")
        assert "ferry-guest booted tag=A" in text
        assert "ferry-guest boot-disks vda\n" in text  # the guest's first disk is the image
        assert "efi-boots" not in text  # no UEFI under SeaBIOS
    finally:
        env.cli("vm", "delete", "bios-first", "--force")


def test_boot_disk_picks_the_disk_and_order_follows_the_command_line(
    env: LabEnv, images: dict[str, str]
) -> None:
    env.cli("vm", "create", "bios-pick", "--host", "host-1", "--memory", "128M",
            "--disk", "32M", "--image", images["A"], "--image", images["B"],
            "--boot-disk", "2", "--start")  # fmt: skip
    try:
        vm = env.vm("bios-pick")
        assert vm["boot_disk"] == 2
        assert vm["disks"][0]["size"] == 32 * 1024**2  # the empty disk was typed first
        text = wait_up(env, "bios-pick")
        assert "ferry-guest booted tag=B" in text  # disk 2 is image B
        assert "ferry-guest boot-disks vdb vdc\n" in text
    finally:
        env.cli("vm", "delete", "bios-pick", "--force")


def test_bad_firmware_input_is_one_line_and_changes_nothing(
    env: LabEnv, images: dict[str, str], tmp_path: Path
) -> None:
    cli = env.cli
    before = [vm["name"] for vm in cli.json("vm", "list")]
    line = cli.fails("vm", "create", "bad", "--host", "host-1", "--image", images["A"],
                     "--firmware", "efi")  # fmt: skip
    assert "--firmware must be bios or uefi" in line
    line = cli.fails("vm", "create", "bad", "--host", "host-1", "--image", images["A"],
                     "--disk", "8M", "--boot-disk", "2")  # fmt: skip
    assert "--boot-disk 2 names no disk" in line and "2" in line
    # A host without OVMF: its agent reads an empty firmware descriptor dir.
    empty = tmp_path / "no-firmware"
    empty.mkdir()
    env.restart_agent(2, firmware_descriptors=str(empty))
    try:
        line = cli.fails("vm", "create", "bad", "--host", "host-2", "--image", images["A"],
                         "--firmware", "uefi")  # fmt: skip
        assert "no UEFI firmware (OVMF)" in line and "apt-get install ovmf" in line
        assert cli.json("host", "show", "host-2")["firmware"] == ["bios"]
        assert cli.json("host", "show", "host-1")["firmware"] == ["bios", "uefi"]
        # A UEFI VM from elsewhere is refused before anything is written there.
        cli("vm", "create", "uefi-off", "--host", "host-1", "--disk", "8M", "--firmware", "uefi")
        folder = env.lab.images_dir / "export-uefi-off"
        cli("vm", "export", "uefi-off", "--to", str(folder))
        line = cli.fails("vm", "import", str(folder), "--host", "host-2", "--name", "elsewhere")
        assert "boots through UEFI but host 'host-2' has no UEFI firmware (OVMF)" in line
        assert "elsewhere" not in [vm["name"] for vm in cli.json("vm", "list")]
        cli("vm", "delete", "uefi-off")
    finally:
        env.restart_agent(2, firmware_descriptors="/usr/share/qemu/firmware")
        cli("vm", "delete", "uefi-off", check=False)
    assert [vm["name"] for vm in cli.json("vm", "list")] == before


@pytest.mark.timeout(600)
def test_uefi_variable_survives_shared_and_copy_moves(env: LabEnv, images: dict[str, str]) -> None:
    cli = env.cli
    name = "uefi-mover"
    cli("vm", "create", name, "--host", "host-1", "--memory", "160M", "--volume", "shared",
        "--image", images["A"], "--disk", "32M", "--firmware", "uefi", "--start")  # fmt: skip
    try:
        vm = env.vm(name)
        assert vm["firmware"] == "uefi"
        store = [d for d in vm["disks"] if d["firmware"]]
        assert len(store) == 1 and vm["disks"][-1]["firmware"]  # carried like a disk, last
        text = wait_up(env, name)
        assert efi_boots(text) == 1
        assert "ferry-guest boot-disks vda\n" in text  # the store is no guest disk

        moved = json.loads(cli("vm", "move", name, "--to", "host-2", "--storage", "shared",
                               "--json").stdout.splitlines()[-1])  # fmt: skip
        assert moved["result"] == "ok" and moved["host"] == "host-2"
        assert efi_boots(restart(env, name, "host-2")) == 2

        moved = json.loads(cli("vm", "move", name, "--to", "host-1", "--storage", "copy",
                               "--json").stdout.splitlines()[-1])  # fmt: skip
        assert moved["result"] == "ok" and moved["host"] == "host-1"
        assert efi_boots(restart(env, name, "host-1")) == 3
    finally:
        cli("vm", "delete", name, "--force", check=False)


# Each UEFI boot (OVMF, its shell's 5 s countdown, the kernel under TCG) takes about a
# minute on a loaded machine: these tests boot two or three times, past pytest's 300 s.
@pytest.mark.timeout(600)
def test_uefi_variable_survives_export_and_import(env: LabEnv, images: dict[str, str]) -> None:
    cli = env.cli
    name = "uefi-exported"
    cli("vm", "create", name, "--host", "host-1", "--memory", "160M",
        "--image", images["A"], "--disk", "32M", "--firmware", "uefi", "--start")  # fmt: skip
    try:
        assert efi_boots(wait_up(env, name)) == 1
        cli("vm", "stop", name)
        folder = env.lab.images_dir / "export-uefi"  # exports go inside image_dirs
        cli("vm", "export", name, "--to", str(folder))
        exported = json.loads((folder / "vm.json").read_text())
        assert exported["firmware"] == "uefi" and exported["vars_disk"] == 2
        cli("vm", "delete", name)
        cli("vm", "import", str(folder), "--host", "host-2", "--mode", "copy")
        cli("vm", "start", name, "--host", "host-2")
        assert efi_boots(wait_up(env, name, "host-2")) == 2
    finally:
        for host in ("host-1", "host-2"):
            cli("vm", "delete", name, "--force", "--host", host, check=False)


@pytest.mark.timeout(600)
def test_uefi_variable_survives_replication_planned_and_test_failover(
    env: LabEnv, images: dict[str, str]
) -> None:
    cli = env.cli
    name = "uefi-keeper"
    cli("vm", "create", name, "--host", "host-1", "--memory", "160M",
        "--image", images["A"], "--disk", "32M", "--firmware", "uefi", "--start")  # fmt: skip
    try:
        assert efi_boots(wait_up(env, name)) == 1
        # Replication host-1 -> host-2, then a planned failover (its final cycle): the
        # replica VM starts on host-2 with the store as replicated.
        cli("replication", "enable", name, "--replica", "host-2", "--frequency", "30s")
        wait_for(lambda: cli.json("replication", "status", name, "--host", "host-1"),
                 lambda s: s["state"] == "replicating")  # fmt: skip
        out = cli("failover", "planned", name, "--host", "host-1", "--json").stdout
        assert json.loads(out.splitlines()[-1])["host"] == "host-2"
        assert efi_boots(wait_up(env, name, "host-2")) == 2

        # Replication flows back host-2 -> host-1. A cycle after boot 2 wrote its variable,
        # then a test failover boots an overlay over that recovery point on host-1.
        wait_for(lambda: cli.json("replication", "status", name, "--host", "host-2"),
                 lambda s: s["state"] == "replicating")  # fmt: skip
        assert cli.json("replication", "sync", name, "--host", "host-2")["result"] == "ok"
        started = json.loads(cli("failover", "test", name, "--json").stdout.splitlines()[-1])
        assert started["test_vm"] == f"{name}-test"
        assert efi_boots(wait_up(env, f"{name}-test", "host-1")) == 3
        cli("failover", "stop-test", name)
    finally:
        cli("failover", "stop-test", name, check=False)
        for host in ("host-1", "host-2"):
            cli("replication", "remove", name, "--host", host, check=False)
            cli("vm", "delete", name, "--force", "--host", host, check=False)
