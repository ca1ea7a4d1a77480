import json
from pathlib import Path

import pytest

from ferry.core.spec import DiskSpec, RunContext, VmSpec, check_name, check_resources, qemu_argv
from ferry.errors import InvalidInputError

CTX = RunContext(
    qemu_binary="qemu-system-x86_64",
    accelerator="tcg",
    pidfile=Path("/d/vm/qemu.pid"),
    qmp_socket=Path("/run/f/x.qmp"),
    serial_log=Path("/d/vm,odd/serial.log"),
)


def _value_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


def test_argv_pins_machine_type_and_uses_stable_node_names() -> None:
    spec = VmSpec(
        name="web",
        config_version=2,
        memory=512 * 1024**2,
        cpus=2,
        disks=(DiskSpec(path="/d/a.qcow2", size=1), DiskSpec(path="/d/b.qcow2", size=1)),
    )
    argv = qemu_argv(spec, CTX)
    assert argv[0] == "qemu-system-x86_64"
    assert "-nodefaults" in argv and "-daemonize" in argv and "-no-shutdown" in argv
    assert _value_after(argv, "-machine") == ["pc-q35-7.1,accel=tcg"]
    assert _value_after(argv, "-m") == ["512M"]
    assert _value_after(argv, "-smp") == ["2"]
    assert _value_after(argv, "-uuid") == [spec.uuid]
    nodes = [json.loads(v) for v in _value_after(argv, "-blockdev")]
    assert [n["node-name"] for n in nodes] == ["file0", "disk0", "file1", "disk1"]
    assert nodes[1] == {"driver": "qcow2", "file": "file0", "node-name": "disk0"}
    assert nodes[2]["filename"] == "/d/b.qcow2"
    assert _value_after(argv, "-device") == [
        "virtio-blk-pci,drive=disk0,id=vblk0,bootindex=1",  # no kernel: the firmware boots it
        "virtio-blk-pci,drive=disk1,id=vblk1",
    ]
    assert _value_after(argv, "-nic") == ["none"]


def test_commas_in_paths_are_escaped_for_qemu_options() -> None:
    argv = qemu_argv(VmSpec(name="a", config_version=3, memory=64 * 1024**2), CTX)
    chardevs = _value_after(argv, "-chardev")
    assert "file,id=serial0,path=/d/vm,,odd/serial.log" in chardevs


def test_kernel_boot() -> None:
    spec = VmSpec(
        name="g",
        config_version=3,
        memory=64 * 1024**2,
        kernel="/k",
        initrd="/i",
        append="console=ttyS0",
    )
    argv = qemu_argv(spec, CTX)
    assert _value_after(argv, "-kernel") == ["/k"]
    assert _value_after(argv, "-initrd") == ["/i"]
    assert _value_after(argv, "-append") == ["console=ttyS0"]


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 64, "../etc", "a/b"])
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidInputError, match="invalid VM name"):
        check_name(name)


def test_resources() -> None:
    check_resources(256 * 1024**2, 1, host_memory=1024**3, host_cpus=2)
    with pytest.raises(InvalidInputError, match="more than the host has"):
        check_resources(2 * 1024**3, 1, host_memory=1024**3, host_cpus=2)
    with pytest.raises(InvalidInputError, match="too small"):
        check_resources(1024, 1, host_memory=1024**3, host_cpus=2)
    with pytest.raises(InvalidInputError, match="cpus 3 is out of range"):
        check_resources(256 * 1024**2, 3, host_memory=1024**3, host_cpus=2)


def test_image_locks_stay_on_unless_the_host_turns_them_off() -> None:
    spec = VmSpec(name="a", config_version=3, memory=64 * 1024**2,
                  disks=(DiskSpec(path="/d/a.qcow2", size=1),))  # fmt: skip
    files = [json.loads(v) for v in _value_after(qemu_argv(spec, CTX), "-blockdev")][::2]
    assert all("locking" not in node for node in files)
    unlocked = CTX.model_copy(update={"image_locking": False})
    files = [json.loads(v) for v in _value_after(qemu_argv(spec, unlocked), "-blockdev")][::2]
    assert [node["locking"] for node in files] == ["off"]


def test_no_display_unless_asked_and_vnc_only_on_a_unix_socket() -> None:
    plain = VmSpec(name="a", config_version=3, memory=64 * 1024**2)
    assert plain.display == "none"
    argv = qemu_argv(plain, CTX.model_copy(update={"vnc_socket": Path("/run/f/x.vnc")}))
    assert "-vnc" not in argv and _value_after(argv, "-display") == ["none"]
    assert not any(d.startswith("VGA") for d in _value_after(argv, "-device"))
    vnc = plain.model_copy(update={"display": "vnc"})
    argv = qemu_argv(vnc, CTX.model_copy(update={"vnc_socket": Path("/run/f,x/x.vnc")}))
    assert _value_after(argv, "-vnc") == ["unix:/run/f,,x/x.vnc"]
    assert "VGA,id=video0" in _value_after(argv, "-device")
    with pytest.raises(InvalidInputError, match="no socket path"):
        qemu_argv(vnc, CTX)


def test_specs_stored_before_the_display_field_still_load() -> None:
    old = VmSpec(name="a", config_version=3, memory=64 * 1024**2).model_dump()
    del old["display"]
    assert VmSpec.model_validate(old).display == "none"
