"""What a VM is (its spec) and the QEMU command line that runs it.

Pure: no I/O. The agent stores a :class:`VmSpec` per VM in its catalog and
hands it, with the host's :class:`RunContext`, to :func:`qemu_argv`. Node
names are stable so later work (bitmaps, mirrors, exports) can address disks:
disk *i* is file node ``file<i>`` under format node ``disk<i>``, seen by the
guest through device ``vblk<i>``.
"""

from __future__ import annotations

import json
import re
import uuid as uuidlib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ferry.core.cpu_models import MODEL_PATTERN, cpu_argument
from ferry.core.firmware import CODE_NODE, INSTALL_HINT, guest_disk_indexes, uefi_code_argv
from ferry.core.guest_agent import CHANNEL_NAME
from ferry.core.network import (
    network_name_value,
    nic_device,
    nic_mac_value,
    nic_model_value,
    tap_name,
)
from ferry.core.versions import machine_type
from ferry.errors import InvalidInputError, NotFoundError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MIN_MEMORY = 16 * 1024**2
MAX_CPUS = 64


class DiskSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str
    size: int
    format: str = "qcow2"
    # On a shared volume two hosts' QEMUs open the file during a move, so
    # neither may keep its own page cache of it.
    direct: bool = False


class NicSpec(BaseModel):
    """A network card: the host network it joins, its MAC (kept for the VM's
    life) and its model (``virtio``, or a QEMU NIC device name such as ``e1000``)."""

    model_config = ConfigDict(frozen=True)

    # Checked whenever a spec is built or read (a peer's move/replica, an
    # export folder, the catalog): mac and model go into QEMU's -device option.
    network: Annotated[str, AfterValidator(network_name_value)]
    mac: Annotated[str, AfterValidator(nic_mac_value)]
    model: Annotated[str, AfterValidator(nic_model_value)] = "virtio"


class VmSpec(BaseModel):
    """Everything needed to run a VM, as stored in the catalog."""

    model_config = ConfigDict(frozen=True)

    uuid: str = Field(default_factory=lambda: str(uuidlib.uuid4()))
    name: str
    config_version: int
    memory: int
    cpus: int = 1
    disks: tuple[DiskSpec, ...] = ()
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    network: bool = False  # old catalogs; NICs are ``nics`` (none: ``-nic none``)
    nics: tuple[NicSpec, ...] = ()
    # "vnc": a VNC server on a unix socket in the host's runtime dir (never a
    # TCP port), relayed to admins by the agent's API.
    display: Literal["none", "vnc"] = "none"
    # A QEMU CPU model name (core/cpu_models.py); None: the legacy "max" of
    # catalogs made before the field.
    cpu_model: str | None = Field(default=None, pattern=MODEL_PATTERN)
    # A virtio-serial port org.qemu.guest_agent.0 on a unix socket in the
    # host's runtime dir, for qemu-guest-agent in the guest (freeze, shutdown).
    guest_agent: bool = False
    # "uefi": OVMF, with the VM's own variable store as disk ``vars_disk``
    # (attached as pflash1, never shown to the guest; core/firmware.py).
    firmware: Literal["bios", "uefi"] = "bios"
    # Which of the disks the guest sees it boots from (0: the first).
    boot_disk: int = 0
    vars_disk: int | None = None


class RunContext(BaseModel):
    """Host-side facts a command line needs besides the spec."""

    model_config = ConfigDict(frozen=True)

    qemu_binary: str
    accelerator: str
    pidfile: Path
    qmp_socket: Path
    serial_log: Path
    # QEMU's own messages (-D): after -daemonize its stderr is gone, so this
    # file holds its last words when it dies.
    qemu_log: Path | None = None
    incoming: bool = False
    # Start with the vCPUs stopped (-S): the block layer works, the guest waits.
    paused: bool = False
    # Keep what an earlier process of the same run wrote (refresh-vms).
    serial_append: bool = False
    # QEMU's image locks (host.toml image_locking); off only where a lab tests fencing.
    image_locking: bool = True
    # OVMF's code image on this host (a VM with firmware "uefi"; None: not installed).
    uefi_code: str | None = None
    uefi_code_format: str = "raw"
    # The VNC display's unix socket (a VM with display "vnc").
    vnc_socket: Path | None = None
    # The guest agent channel's unix socket (a VM with guest_agent).
    guest_agent_socket: Path | None = None
    # Test hook (host.toml test_monitor): a second QMP monitor, where benchmarks
    # inject guest writes with HMP qemu-io while the agent holds the first.
    test_monitor_socket: Path | None = None
    # This host's key in tap names (ferry.core.network.tap_name): NIC i of the
    # VM gets tap tap_name(tap_host, uuid, i). Needed by a VM with NICs.
    tap_host: str | None = None
    # Which of the host's two sets of tap names (a refresh uses the other one).
    tap_slot: int = 0


def check_name(name: str, *, what: str = "VM name") -> str:
    if not NAME_RE.fullmatch(name):
        raise InvalidInputError(
            f"invalid {what} {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_resources(memory: int, cpus: int, *, host_memory: int, host_cpus: int) -> None:
    """Refuse sizes no host could run, or more than this host has."""
    if memory < MIN_MEMORY:
        raise InvalidInputError(f"memory {memory} bytes is too small (at least 16M)")
    if memory > host_memory:
        raise InvalidInputError(
            f"memory {memory // 1024**2}M is more than the host has ({host_memory // 1024**2}M)"
        )
    if not 1 <= cpus <= min(MAX_CPUS, host_cpus):
        raise InvalidInputError(
            f"cpus {cpus} is out of range (1..{min(MAX_CPUS, host_cpus)} on this host)"
        )


def _opt(value: str | Path) -> str:
    """Escape a value for QEMU's key=value option syntax (commas double)."""
    return str(value).replace(",", ",,")


def _flash_options(spec: VmSpec, ctx: RunContext) -> str:
    """The machine's flash images: OVMF's code and the VM's variable store (UEFI)."""
    if spec.firmware != "uefi":
        return ""
    if ctx.uefi_code is None:
        raise NotFoundError(
            f"VM {spec.name!r} boots through UEFI but this host has no OVMF firmware: "
            f"{INSTALL_HINT}"
        )
    if spec.vars_disk is None or not 0 <= spec.vars_disk < len(spec.disks):
        raise InvalidInputError(f"VM {spec.name!r} boots through UEFI but has no variable store")
    return f",pflash0={CODE_NODE},pflash1=disk{spec.vars_disk}"


def qemu_argv(spec: VmSpec, ctx: RunContext) -> list[str]:
    """The full QEMU command line for ``spec`` on a host described by ``ctx``."""
    # The VM's own model (named ones with enforce), or the legacy "max"; never
    # "host" by default: it aborts on an MSR on nested hosts (DESIGN.md section 4).
    cpu = cpu_argument(spec.cpu_model)
    argv = [
        ctx.qemu_binary,
        "-name", f"guest={_opt(spec.name)},debug-threads=on",
        "-uuid", spec.uuid,
        "-nodefaults",
        "-no-user-config",
        "-machine", f"{machine_type(spec.config_version)},accel={ctx.accelerator}"
                    + _flash_options(spec, ctx),
        "-cpu", cpu,
        "-m", f"{spec.memory // 1024**2}M",
        "-smp", str(spec.cpus),
        "-display", "none",
        "-no-shutdown",
        "-daemonize",
        "-pidfile", str(ctx.pidfile),
        "-chardev", f"socket,id=qmp,path={_opt(ctx.qmp_socket)},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", f"file,id=serial0,path={_opt(ctx.serial_log)}"
                    + (",append=on" if ctx.serial_append else ""),
        "-serial", "chardev:serial0",
        "-msg", "timestamp=on",
    ]  # fmt: skip
    if ctx.qemu_log is not None:
        argv += ["-D", str(ctx.qemu_log)]
    if spec.display == "vnc":
        if ctx.vnc_socket is None:
            raise InvalidInputError(f"VM {spec.name!r} has a VNC display but no socket path")
        # A unix socket only: the agent relays it to admins over its TLS API.
        argv += ["-vnc", f"unix:{_opt(ctx.vnc_socket)}", "-device", "VGA,id=video0"]
    if not spec.nics:
        argv += ["-nic", "none"]
    for index, nic in enumerate(spec.nics):
        if ctx.tap_host is None:
            raise InvalidInputError(f"VM {spec.name!r} has NICs but the host gave no tap names")
        tap = tap_name(ctx.tap_host, spec.uuid, index, ctx.tap_slot)
        # The agent attaches the tap to the network's bridge once QEMU made it.
        argv += ["-netdev", f"tap,id=net{index},ifname={tap},script=no,downscript=no",
                 "-device", f"{nic_device(nic.model)},netdev=net{index},mac={nic.mac},"
                            f"id=nic{index}"]  # fmt: skip
    if spec.kernel:
        argv += ["-kernel", spec.kernel]
        if spec.initrd:
            argv += ["-initrd", spec.initrd]
        if spec.append:
            argv += ["-append", spec.append]
    if spec.firmware == "uefi":
        assert ctx.uefi_code is not None  # _flash_options refused it
        argv += uefi_code_argv(ctx.uefi_code, ctx.uefi_code_format)
    guest_disks = guest_disk_indexes(len(spec.disks), spec.vars_disk)
    boot_at = guest_disks[spec.boot_disk] if spec.boot_disk < len(guest_disks) else None
    for index, disk in enumerate(spec.disks):
        file_node: dict[str, object] = {
            "driver": "file",
            "filename": disk.path,
            "node-name": f"file{index}",
        }
        if disk.direct:
            file_node["cache"] = {"direct": True}
        if not ctx.image_locking:
            file_node["locking"] = "off"
        fmt_node = {"driver": disk.format, "file": f"file{index}", "node-name": f"disk{index}"}
        argv += ["-blockdev", json.dumps(file_node, separators=(",", ":"))]
        argv += ["-blockdev", json.dumps(fmt_node, separators=(",", ":"))]
        if index == spec.vars_disk:
            continue  # the machine's pflash1, not a guest disk
        # Without a kernel the firmware boots the boot disk (a kernel's own
        # option ROM comes first anyway, so then nothing changes).
        boot = ",bootindex=1" if index == boot_at and not spec.kernel else ""
        argv += ["-device", f"virtio-blk-pci,drive=disk{index},id=vblk{index}{boot}"]
    if spec.guest_agent:
        if ctx.guest_agent_socket is None:
            raise InvalidInputError(f"VM {spec.name!r} has a guest agent but no socket path")
        # After the disks, so adding the channel moves no disk's PCI slot.
        argv += [
            "-chardev", f"socket,id=qga0,path={_opt(ctx.guest_agent_socket)},server=on,wait=off",
            "-device", "virtio-serial-pci,id=vserial0",
            "-device", f"virtserialport,chardev=qga0,id=qga0port,name={CHANNEL_NAME}",
        ]  # fmt: skip
    if ctx.test_monitor_socket is not None:
        argv += ["-chardev", f"socket,id=testmon,path={_opt(ctx.test_monitor_socket)},"
                 "server=on,wait=off", "-mon", "chardev=testmon,mode=control"]  # fmt: skip
    if ctx.incoming:
        # Wait, paused, for a migration stream the agent points it at later.
        argv += ["-incoming", "defer", "-S"]
    elif ctx.paused:
        argv += ["-S"]
    return argv
