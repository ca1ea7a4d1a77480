"""A libvirt domain, as ``virsh dumpxml`` writes it, read into an adoption plan.

What is carried: name, UUID, memory, vCPUs, a ``custom`` CPU model, firmware
(BIOS or UEFI), file disks (raw, qcow2, vmdk, vdi as ``<driver type>`` says;
libvirt's own default when it says nothing is raw), their boot order, NICs on
libvirt networks or bridges with their MACs, direct kernel boot and a
graphical console (as ferry's VNC display). Everything else the domain has
is named in the plan's ``not_carried``. Disks of other kinds (block devices,
network storage, backing chains) are refused: a VM without them would not be
the same VM.
"""

from __future__ import annotations

import uuid as uuidlib
from xml.etree.ElementTree import Element

from ferry.core.adopt import safe_xml
from ferry.core.adopt.plan import (
    DISK_FORMATS,
    AdoptedDisk,
    AdoptedNic,
    AdoptionPlan,
    DiskFormat,
    Firmware,
    adopted_name,
    adopted_network,
    check_macs,
    libvirt_bytes,
    normalise_mac,
)
from ferry.core.guest_agent import CHANNEL_NAME
from ferry.core.network import check_nic_model
from ferry.errors import InvalidInputError

# Devices a ferry VM gets anyway, or that only wire up others: not worth a note.
_IMPLIED = {
    "disk",
    "interface",
    "graphics",
    "controller",
    "input",
    "emulator",
    "console",
    "serial",
    "memballoon",
    "video",
}
_CPU_MODES_WITHOUT_MODEL = ("host-passthrough", "host-model", "maximum")
# Elements under <domain> that change how the VM runs and that ferry does not copy.
_TUNING = (
    "cputune",
    "memtune",
    "blkiotune",
    "numatune",
    "memoryBacking",
    "iothreads",
    "resource",
    "sysinfo",
    "idmap",
    "keywrap",
    "launchSecurity",
)


def parse_domain(data: bytes, *, what: str = "the domain XML") -> AdoptionPlan:
    """The plan for the domain in ``data``; refuses anything unsafe or unsupported."""
    root = safe_xml.parse(data, what=what)
    if safe_xml.local(root.tag) != "domain":
        raise InvalidInputError(
            f"{what} is not a libvirt domain (its root is "
            f"<{safe_xml.local(root.tag)}>, not <domain>)"
        )
    kind = root.get("type", "")
    if kind not in ("kvm", "qemu"):
        raise InvalidInputError(
            f"{what} is a {kind or 'typeless'} domain; ferry adopts KVM/QEMU domains only"
        )
    source_name = safe_xml.text(root, "name")
    name, name_note = adopted_name(source_name, fallback="adopted")
    label = f"domain {source_name or '?'}"
    notes: list[str] = [name_note] if name_note else []

    memory = _memory(root, label, notes)
    cpus = _vcpus(root, label, notes)
    firmware, kernel, initrd, append, boot_first = _os(root, label, notes)
    cpu_model = _cpu(root, label, notes)
    devices = safe_xml.child(root, "devices")
    disks: list[AdoptedDisk] = []
    nics: list[AdoptedNic] = []
    display: str = "none"
    guest_agent = False
    boot_orders: list[tuple[int, int]] = []  # (order, disk index)
    if devices is not None:
        for element in devices:
            tag = safe_xml.local(element.tag)
            if tag == "disk":
                disk = _disk(element, label, notes)
                if disk is not None:
                    order = _boot_order(element)
                    if order is not None:
                        boot_orders.append((order, len(disks)))
                    disks.append(disk)
            elif tag == "interface":
                nic = _interface(element, label, notes)
                if nic is not None:
                    nics.append(nic)
                    if _boot_order(element) is not None:
                        notes.append(
                            f"{label}: network boot (PXE) of its NICs is not carried "
                            "over; the VM boots from its disk"
                        )
            elif tag == "graphics":
                display = _graphics(element, notes)
        guest_agent = any(_is_guest_agent(e) for e in safe_xml.children(devices, "channel"))
        kinds = sorted({safe_xml.local(e.tag) for e in devices if not _is_guest_agent(e)}
                       - _IMPLIED)  # fmt: skip
        if kinds:
            notes.append(f"{label}: these devices are not carried over: {', '.join(kinds)}")
    if boot_first in ("network", "cdrom", "fd"):
        notes.append(f"{label} boots from {boot_first} first; ferry boots it from its disk")
    tuning = [t for t in _TUNING if safe_xml.child(root, t) is not None]
    if tuning:
        notes.append(f"{label}: host tuning ({', '.join(tuning)}) is not carried over")
    _clock_and_features(root, label, notes)
    if not disks and kernel is None:
        raise InvalidInputError(f"{what}: {label} has neither a disk nor a kernel to boot")
    boot_disk = min(boot_orders)[1] if boot_orders else 0
    nic_tuple = tuple(nics)
    check_macs(nic_tuple, what=label)
    return AdoptionPlan(
        origin="libvirt",
        name=name,
        memory=memory,
        cpus=cpus,
        disks=tuple(disks),
        nics=nic_tuple,
        uuid=_uuid(root),
        cpu_model=cpu_model,
        firmware=firmware,
        boot_disk=boot_disk,
        kernel=kernel,
        initrd=initrd,
        append=append,
        display="vnc" if display == "vnc" else "none",
        guest_agent=guest_agent,
        not_carried=tuple(notes),
    )


def _uuid(root: Element) -> str | None:
    raw = safe_xml.text(root, "uuid")
    if not raw:
        return None
    try:
        return str(uuidlib.UUID(raw))
    except ValueError:
        raise InvalidInputError(f"the domain's UUID {raw!r} is malformed") from None


def _memory(root: Element, label: str, notes: list[str]) -> int:
    element = safe_xml.child(root, "memory")
    if element is None:
        raise InvalidInputError(f"{label} has no <memory>")
    memory = libvirt_bytes(element.text, element.get("unit"), what=f"{label}'s <memory>")
    current = safe_xml.child(root, "currentMemory")
    if current is not None:
        now = libvirt_bytes(current.text, current.get("unit"), what=f"{label}'s <currentMemory>")
        if now != memory:
            notes.append(
                f"{label}: the balloon's current memory ({now // 1024**2}M) is not "
                f"carried over; it gets all of its {memory // 1024**2}M"
            )
    if safe_xml.child(root, "maxMemory") is not None:
        notes.append(f"{label}: memory hotplug (<maxMemory>) is not carried over")
    return memory


def _vcpus(root: Element, label: str, notes: list[str]) -> int:
    element = safe_xml.child(root, "vcpu")
    if element is None:
        return 1
    raw = (element.text or "").strip()
    if not raw.isdigit() or int(raw) < 1:
        raise InvalidInputError(f"{label}'s <vcpu> is not a positive number ({raw!r})")
    count = int(raw)
    current = element.get("current")
    if current is not None and current.isdigit() and int(current) != count:
        notes.append(
            f"{label}: vCPU hotplug ({current} of {count} online) is not carried "
            f"over; it gets {count} vCPUs"
        )
    if element.get("cpuset"):
        notes.append(f"{label}: vCPU pinning (cpuset {element.get('cpuset')}) is not carried over")
    return count


def _os(
    root: Element, label: str, notes: list[str]
) -> tuple[Firmware, str | None, str | None, str | None, str | None]:
    """Firmware, direct kernel boot (kernel, initrd, cmdline) and the first <boot dev>."""
    element = safe_xml.child(root, "os")
    if element is None:
        raise InvalidInputError(f"{label} has no <os>")
    kind = safe_xml.child(element, "type")
    if kind is None or (kind.text or "").strip() != "hvm":
        raise InvalidInputError(f"{label} is not a full virtual machine (<os><type>hvm)")
    arch = kind.get("arch", "x86_64")
    if arch != "x86_64":
        raise InvalidInputError(f"{label} is an {arch} machine; ferry runs x86_64 VMs")
    machine = kind.get("machine", "")
    if machine and "q35" not in machine:
        notes.append(
            f"{label}: machine type {machine} is not carried over; it becomes "
            "ferry's q35 (its devices appear at other PCI addresses)"
        )
    firmware: Firmware = "bios"
    loader = safe_xml.child(element, "loader")
    if element.get("firmware") == "efi" or (
        loader is not None
        and (
            loader.get("type") == "pflash"
            or "OVMF" in (loader.text or "")
            or "edk2" in (loader.text or "")
        )
    ):
        firmware = "uefi"
    if loader is not None and loader.get("secure") == "yes":
        notes.append(f"{label}: UEFI Secure Boot is not carried over")
    if safe_xml.child(element, "nvram") is not None:
        notes.append(
            f"{label}: its UEFI variables (<nvram>) are not carried over; it starts "
            "with a fresh variable store (boot entries may need making again)"
        )
    kernel = safe_xml.text(element, "kernel") or None
    initrd = safe_xml.text(element, "initrd") or None
    append = safe_xml.text(element, "cmdline") or None
    if initrd and not kernel:
        raise InvalidInputError(f"{label} has an <initrd> but no <kernel>")
    if safe_xml.child(element, "dtb") is not None:
        notes.append(f"{label}: its device tree (<dtb>) is not carried over")
    boots = safe_xml.children(element, "boot")
    first = boots[0].get("dev") if boots else None
    if safe_xml.child(element, "smbios") is not None:
        notes.append(f"{label}: its SMBIOS settings are not carried over")
    return firmware, kernel, initrd, append, first


def _cpu(root: Element, label: str, notes: list[str]) -> str | None:
    element = safe_xml.child(root, "cpu")
    if element is None:
        return None
    mode = element.get("mode", "custom")
    model: str | None = None
    if mode in _CPU_MODES_WITHOUT_MODEL:
        notes.append(
            f"{label}: CPU mode {mode} is not carried over; it runs ferry's default "
            "CPU model (the same on every host, so it can move)"
        )
    else:
        model = safe_xml.text(element, "model") or None
    features = [f.get("name", "?") for f in safe_xml.children(element, "feature")]
    if features:
        notes.append(f"{label}: CPU feature changes ({', '.join(features)}) are not carried over")
    if safe_xml.child(element, "topology") is not None:
        notes.append(f"{label}: the CPU topology (sockets/cores/threads) is not carried over")
    if safe_xml.child(element, "numa") is not None:
        notes.append(f"{label}: the guest NUMA layout is not carried over")
    return model


def _disk(element: Element, label: str, notes: list[str]) -> AdoptedDisk | None:
    device = element.get("device", "disk")
    kind = element.get("type", "file")
    target = safe_xml.child(element, "target")
    dev = target.get("dev", "?") if target is not None else "?"
    source = safe_xml.child(element, "source")
    if device in ("cdrom", "floppy"):
        path = source.get("file") if source is not None else None
        notes.append(f"{label}: {device} {dev}{f' ({path})' if path else ''} is not carried over")
        return None
    if device != "disk":
        raise InvalidInputError(f"{label}: disk {dev} is a {device}; ferry adopts plain disks")
    if kind != "file":
        raise InvalidInputError(
            f"{label}: disk {dev} is a {kind} disk; ferry adopts disks that "
            "are image files (copy it into a file first)"
        )
    path = source.get("file") if source is not None else None
    if not path:
        raise InvalidInputError(f"{label}: disk {dev} names no source file")
    backing = safe_xml.child(element, "backingStore")
    if backing is not None and safe_xml.child(backing, "source") is not None:
        raise InvalidInputError(
            f"{label}: disk {dev} ({path}) has a backing chain; flatten it "
            "first (virsh blockpull, or qemu-img convert)"
        )
    driver = safe_xml.child(element, "driver")
    # libvirt itself treats a disk without <driver type> as raw (it never probes).
    raw_format = (driver.get("type") if driver is not None else None) or "raw"
    if raw_format not in DISK_FORMATS:
        raise InvalidInputError(
            f"{label}: disk {dev} is {raw_format}; ferry adopts {', '.join(DISK_FORMATS)} images"
        )
    fmt: DiskFormat = raw_format
    bus = target.get("bus") if target is not None else None
    if bus and bus != "virtio":
        notes.append(
            f"{label}: disk {dev} on bus {bus} becomes a virtio disk (the guest needs "
            "virtio-blk drivers)"
        )
    for flag in ("readonly", "shareable", "transient"):
        if safe_xml.child(element, flag) is not None:
            notes.append(f"{label}: disk {dev} is {flag}; that is not carried over")
    return AdoptedDisk(source=path, format=fmt, target=dev)


def _interface(element: Element, label: str, notes: list[str]) -> AdoptedNic | None:
    kind = element.get("type", "")
    source = safe_xml.child(element, "source")
    mac_el = safe_xml.child(element, "mac")
    raw_mac = mac_el.get("address") if mac_el is not None else None
    mac = normalise_mac(raw_mac, what=label) if raw_mac else None
    network = None
    if source is not None:
        if kind == "network":
            network = source.get("network")
        elif kind == "bridge":
            network = source.get("bridge")
    if not network:
        notes.append(
            f"{label}: the {kind or 'untyped'} NIC {mac or ''} is not carried over "
            "(ferry attaches NICs to host networks)".replace("  ", " ")
        )
        return None
    model_el = safe_xml.child(element, "model")
    model = check_nic_model((model_el.get("type") if model_el is not None else None) or "virtio")
    for extra in ("bandwidth", "filterref", "vlan", "virtualport"):
        if safe_xml.child(element, extra) is not None:
            notes.append(f"{label}: the {extra} of NIC {mac or network} is not carried over")
    return AdoptedNic(network=adopted_network(network, notes), mac=mac, model=model)


def _graphics(element: Element, notes: list[str]) -> str:
    kind = element.get("type", "")
    if kind in ("vnc", "spice"):
        if kind == "spice":
            notes.append("the SPICE display becomes a VNC display (ferry vm vnc)")
        notes.append(
            "the graphical console's listen address and password are not carried "
            "over; ferry relays it to admins (ferry vm vnc)"
        )
        return "vnc"
    notes.append(f"the {kind} display is not carried over")
    return "none"


def _is_guest_agent(element: Element) -> bool:
    """A virtio channel for qemu-guest-agent (ferry gives the VM its own)."""
    if safe_xml.local(element.tag) != "channel":
        return False
    target = safe_xml.child(element, "target")
    return target is not None and target.get("name") == CHANNEL_NAME


def _boot_order(element: Element) -> int | None:
    boot = safe_xml.child(element, "boot")
    order = boot.get("order") if boot is not None else None
    return int(order) if order is not None and order.isdigit() else None


def _clock_and_features(root: Element, label: str, notes: list[str]) -> None:
    clock = safe_xml.child(root, "clock")
    if clock is not None and clock.get("offset", "utc") != "utc":
        notes.append(
            f"{label}: its clock offset ({clock.get('offset')}) is not carried over; "
            "the guest's clock starts in UTC"
        )
    features = safe_xml.child(root, "features")
    if features is not None:
        special = sorted(
            {safe_xml.local(f.tag) for f in features} & {"hyperv", "kvm", "smm", "sev", "tdx"}
        )
        if special:
            notes.append(f"{label}: the features {', '.join(special)} are not carried over")
