"""The guest agent channel on the QEMU command line (VmSpec.guest_agent)."""

from pathlib import Path

import pytest

from ferry.core.guest_agent import check_app_consistent_every, parse_app_consistent_every
from ferry.core.spec import DiskSpec, RunContext, VmSpec, qemu_argv
from ferry.errors import InvalidInputError

CTX = RunContext(qemu_binary="qemu-system-x86_64", accelerator="tcg",
                 pidfile=Path("/d/vm/qemu.pid"), qmp_socket=Path("/run/f/x.qmp"),
                 serial_log=Path("/d/vm/serial.log"))  # fmt: skip
SPEC = VmSpec(name="db", config_version=3, memory=64 * 1024**2,
              disks=(DiskSpec(path="/d/a.qcow2", size=1),))  # fmt: skip


def test_no_channel_unless_asked() -> None:
    argv = qemu_argv(SPEC, CTX.model_copy(update={"guest_agent_socket": Path("/run/f/x.qga")}))
    assert not any("virtserialport" in a or "qga" in a for a in argv)


def test_the_channel_is_a_named_virtio_serial_port_on_a_unix_socket_after_the_disks() -> None:
    spec = SPEC.model_copy(update={"guest_agent": True})
    argv = qemu_argv(spec, CTX.model_copy(update={"guest_agent_socket": Path("/run/f,x/x.qga")}))
    chardev = argv[argv.index("-chardev", argv.index("-serial")) + 1]
    assert chardev == "socket,id=qga0,path=/run/f,,x/x.qga,server=on,wait=off"
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert "virtio-serial-pci,id=vserial0" in devices
    assert "virtserialport,chardev=qga0,id=qga0port,name=org.qemu.guest_agent.0" in devices
    blk = next(i for i, d in enumerate(devices) if d.startswith("virtio-blk-pci"))
    assert blk < devices.index("virtio-serial-pci,id=vserial0")  # no disk's PCI slot moves
    with pytest.raises(InvalidInputError, match="no socket path"):
        qemu_argv(spec, CTX)


def test_the_interval_and_its_refusals() -> None:
    assert parse_app_consistent_every("1h") == 3600
    assert parse_app_consistent_every("30m") == 1800
    assert parse_app_consistent_every("off") == 0
    for bad, says in (("soon", "invalid --app-consistent-every 'soon'"),
                      ("200h", "more than 7 days"), ("-1h", "invalid")):  # fmt: skip
        with pytest.raises(InvalidInputError, match=says):
            parse_app_consistent_every(bad)
    with pytest.raises(InvalidInputError, match="created with --guest-agent"):
        check_app_consistent_every(3600, SPEC)
    agent = SPEC.model_copy(update={"guest_agent": True})
    assert check_app_consistent_every(3600, agent) == 3600
    assert check_app_consistent_every(0, SPEC) is None  # off needs no agent
    assert check_app_consistent_every(None, SPEC) is None
