"""Firmware: OVMF chosen from QEMU's descriptors, the boot disk, the UEFI command line,
and --image/--disk read back in the order they were typed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from ferry.adapters.firmware import find_uefi
from ferry.cli.option_order import TypedOrderCommand, in_typed_order, typed_order
from ferry.core.export_format import ExportedVm
from ferry.core.firmware import (
    UefiFirmware,
    check_boot_disk,
    check_firmware,
    guest_disk_indexes,
    pick_uefi,
)
from ferry.core.spec import DiskSpec, RunContext, VmSpec, qemu_argv
from ferry.errors import InvalidInputError, NotFoundError
from ferry.guest.bootable import boot_append, build_boot_image, startup_nsh, syslinux_cfg
from ferry.guest.build import GuestArtifacts


def descriptor(code: str = "/fw/CODE.fd", features: tuple[str, ...] = (),
               machines: tuple[str, ...] = ("pc-q35-*",)) -> dict[str, Any]:  # fmt: skip
    return {
        "interface-types": ["uefi"],
        "mapping": {"device": "flash",
                    "executable": {"filename": code, "format": "raw"},
                    "nvram-template": {"filename": "/fw/VARS.fd", "format": "raw"}},
        "targets": [{"architecture": "x86_64", "machines": list(machines)}],
        "features": list(features),
    }  # fmt: skip


def test_pick_uefi_takes_the_first_usable_descriptor_by_name() -> None:
    found = pick_uefi([
        ("60-plain.json", descriptor("/fw/plain.fd")),
        ("40-enrolled.json", descriptor("/fw/enrolled.fd", ("requires-smm", "enrolled-keys"))),
        ("50-secure.json", descriptor("/fw/secure.fd", ("requires-smm", "secure-boot"))),
        ("10-i440fx.json", descriptor("/fw/pc.fd", machines=("pc-i440fx-*",))),
    ])  # fmt: skip
    assert found == UefiFirmware(code="/fw/plain.fd", code_format="raw",
                                 vars_template="/fw/VARS.fd", vars_format="raw")  # fmt: skip


@pytest.mark.parametrize("broken", [
    {"interface-types": ["bios"]},
    {"mapping": {"device": "memory"}},
    {"mapping": {"device": "flash", "executable": {"filename": "relative.fd"},
                 "nvram-template": {"filename": "/fw/VARS.fd"}}},
    {"targets": [{"architecture": "aarch64", "machines": ["virt-*"]}]},
    {"targets": "x86_64"},
])  # fmt: skip
def test_pick_uefi_skips_what_it_cannot_use(broken: dict[str, Any]) -> None:
    assert pick_uefi([("a.json", {**descriptor(), **broken})]) is None


def test_find_uefi_reads_descriptor_files_and_skips_missing_firmware(tmp_path: Path) -> None:
    code, template = tmp_path / "CODE.fd", tmp_path / "VARS.fd"
    desc = descriptor(str(code))
    desc["mapping"]["nvram-template"]["filename"] = str(template)
    (tmp_path / "60-x.json").write_text(json.dumps(desc))
    (tmp_path / "10-garbage.json").write_text("{not json")
    assert find_uefi(tmp_path) is None  # the files it names are not there
    code.write_bytes(b"\0" * 4096)
    template.write_bytes(b"\0" * 4096)
    found = find_uefi(tmp_path)
    assert found is not None and found.code == str(code)
    assert find_uefi(tmp_path / "absent") is None


def test_firmware_and_boot_disk_checks() -> None:
    assert check_firmware("uefi") == "uefi"
    with pytest.raises(InvalidInputError, match="--firmware must be bios or uefi"):
        check_firmware("efi")
    check_boot_disk(0, 0)  # no disk at all: nothing to boot, nothing to refuse
    check_boot_disk(2, 3)
    with pytest.raises(InvalidInputError, match="--boot-disk 3 names no disk: the VM has 3"):
        check_boot_disk(3, 3)
    with pytest.raises(InvalidInputError, match="0 or more"):
        check_boot_disk(-1, 3)
    assert guest_disk_indexes(3, 1) == [0, 2]
    assert guest_disk_indexes(2, None) == [0, 1]


CTX = RunContext(qemu_binary="qemu", accelerator="tcg", pidfile=Path("/r/p"),
                 qmp_socket=Path("/r/q"), serial_log=Path("/r/s"),
                 uefi_code="/fw/CODE.fd")  # fmt: skip
DISKS = tuple(DiskSpec(path=f"/d/{i}.qcow2", size=2**20) for i in range(3))


def _after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_uefi_argv_puts_the_store_on_pflash1_and_boots_the_chosen_disk() -> None:
    spec = VmSpec(name="u", config_version=3, memory=2**27, disks=DISKS, firmware="uefi",
                  vars_disk=1, boot_disk=1)  # fmt: skip
    argv = qemu_argv(spec, CTX)
    machine = _after(argv, "-machine")[0]
    assert machine.endswith(",pflash0=fw-code,pflash1=disk1")
    nodes = [json.loads(b) for b in _after(argv, "-blockdev")]
    code = [n for n in nodes if n["node-name"].startswith("fw-code")]
    assert all(n["read-only"] for n in code) and code[0]["filename"] == "/fw/CODE.fd"
    assert any(n["node-name"] == "disk1" and n["driver"] == "qcow2" for n in nodes)
    # The store is no guest device; guest disk 1 is spec disk 2, and it boots.
    assert _after(argv, "-device") == [
        "virtio-blk-pci,drive=disk0,id=vblk0",
        "virtio-blk-pci,drive=disk2,id=vblk2,bootindex=1",
    ]


def test_bios_argv_has_no_flash_and_a_kernel_needs_no_bootindex() -> None:
    spec = VmSpec(name="b", config_version=3, memory=2**27, disks=DISKS[:2], boot_disk=1)
    argv = qemu_argv(spec, CTX)
    assert "pflash" not in _after(argv, "-machine")[0]
    assert _after(argv, "-device")[1].endswith(",bootindex=1")
    kernel = spec.model_copy(update={"kernel": "/k"})
    assert not any("bootindex" in d for d in _after(qemu_argv(kernel, CTX), "-device"))


def test_uefi_argv_without_ovmf_is_one_clear_error() -> None:
    spec = VmSpec(name="u", config_version=3, memory=2**27, disks=DISKS[:1], firmware="uefi",
                  vars_disk=0)  # fmt: skip
    with pytest.raises(NotFoundError, match="no OVMF firmware: install Debian's package ovmf"):
        qemu_argv(spec, CTX.model_copy(update={"uefi_code": None}))


def test_export_folder_carries_firmware_and_refuses_a_store_that_is_not_a_disk() -> None:
    base = {"name": "v", "uuid": "12345678-1234-1234-1234-123456789abc", "config_version": 3,
            "memory": 2**27, "cpus": 1,
            "disks": [{"file": "disk0.qcow2", "size": 2**20, "format": "qcow2"},
                      {"file": "disk1.qcow2", "size": 540672, "format": "qcow2"}]}  # fmt: skip
    vm = ExportedVm.model_validate({**base, "firmware": "uefi", "vars_disk": 1})
    assert (vm.firmware, vm.vars_disk, vm.boot_disk) == ("uefi", 1, 0)
    assert ExportedVm.model_validate(base).firmware == "bios"  # older folders
    for bad in ({"firmware": "uefi"}, {"firmware": "uefi", "vars_disk": 2},
                {"firmware": "bios", "vars_disk": 0}):  # fmt: skip
        with pytest.raises(ValueError, match=r"vars_disk|variable store"):
            ExportedVm.model_validate({**base, **bad})


# -- --image and --disk in the order typed ------------------------------------------------


def test_in_typed_order_interleaves_and_keeps_what_the_order_misses() -> None:
    values = {"image": ["a.img", "b.img"], "disk": ["1G", "2G"]}
    order = ["name", "disk", "image", "memory", "disk", "image"]
    assert in_typed_order(order, values) == [("disk", "1G"), ("image", "a.img"),
                                             ("disk", "2G"), ("image", "b.img")]  # fmt: skip
    assert in_typed_order([], values) == [("image", "a.img"), ("image", "b.img"),
                                          ("disk", "1G"), ("disk", "2G")]  # fmt: skip


def _app(seen: list[list[tuple[str, str]]]) -> typer.Typer:
    app = typer.Typer()

    @app.command(cls=TypedOrderCommand)
    def create(
        ctx: typer.Context,
        name: str,
        disk: list[str] = typer.Option([], "--disk"),
        image: list[str] = typer.Option([], "--image", "-i"),
        append: str | None = typer.Option(None, "--append"),
    ) -> None:
        seen.append(in_typed_order(typed_order(ctx), {"image": image, "disk": disk}))

    @app.command()
    def other() -> None:  # a second command, so 'create' is a subcommand as in ferry
        pass

    return app


@pytest.mark.parametrize(("argv", "expected"), [
    (["--image", "root.qcow2", "--disk", "10G"], [("image", "root.qcow2"), ("disk", "10G")]),
    (["--disk", "10G", "--image", "root.qcow2"], [("disk", "10G"), ("image", "root.qcow2")]),
    (["--disk=1G", "-i", "x", "--append", "--disk", "--image=y", "--disk", "2G"],
     [("disk", "1G"), ("image", "x"), ("image", "y"), ("disk", "2G")]),
])  # fmt: skip
def test_the_command_sees_disks_in_the_order_typed(
    argv: list[str], expected: list[tuple[str, str]]
) -> None:
    seen: list[list[tuple[str, str]]] = []
    result = CliRunner().invoke(_app(seen), ["create", "vm1", *argv])
    assert result.exit_code == 0, result.output
    assert seen == [expected]  # "--append --disk": a value, not a disk


def test_a_usage_error_is_reported_once_as_before() -> None:
    seen: list[list[tuple[str, str]]] = []
    result = CliRunner().invoke(_app(seen), ["create", "vm1", "--disk"])
    assert result.exit_code == 2 and seen == []
    assert result.output.count("requires an argument") == 1


# -- the bootable test image -----------------------------------------------------------------


def test_boot_image_configs_boot_the_guest_with_its_tag(tmp_path: Path) -> None:
    guest = GuestArtifacts(kernel=tmp_path / "k", initrd=tmp_path / "i", append="console=ttyS0")
    append = boot_append(guest, "B")
    assert append == "console=ttyS0 ferry.boot=B"
    cfg = syslinux_cfg(append)
    assert "LINUX /linux.efi" in cfg and "INITRD /initrd.img" in cfg and f"APPEND {append}" in cfg
    assert startup_nsh(append) == f"fs0:\r\n\\linux.efi initrd=\\initrd.img {append}\r\n"
    with pytest.raises(InvalidInputError, match="boot image tag 'a b'"):
        build_boot_image(tmp_path / "x.img", guest, tag="a b")
    with pytest.raises(InvalidInputError, match="is not a directory"):
        build_boot_image(tmp_path / "none" / "x.img", guest, tag="B")
    assert not (tmp_path / "none").exists()
