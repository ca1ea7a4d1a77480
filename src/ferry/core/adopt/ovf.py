"""An OVF appliance's descriptor (OVF 1.0 or 2.0, as VMware and VirtualBox export
it) and its manifest, read into an adoption plan.

What is carried: the one virtual system's name, vCPUs, memory, firmware
(VMware's ``vmw:Config firmware``, VirtualBox's ``vbox:Machine`` firmware),
its disks in the order of the hardware section (each file's href, size,
capacity and VMDK/VDI/raw/qcow2 format as the descriptor declares it; a disk
without a file becomes an empty disk of its capacity), NICs on the
descriptor's networks with their MACs (``rasd:Address``, or VirtualBox's
adapter list). CD and floppy drives, USB, sound, serial ports, product
properties, the EULA and VMware's extra configuration are named in the
plan's notes. Elements are matched by local name so ``rasd``/``sasd``/
``epasd`` items of OVF 2.0 read the same as OVF 1.0's.

The manifest (``NAME.mf``) lists ``SHA1(file)= hex`` or ``SHA256(file)= hex``
lines (VMware writes no space before ``=``, VirtualBox one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from xml.etree.ElementTree import Element

from ferry.core.adopt import safe_xml
from ferry.core.adopt.ova import check_relative
from ferry.core.adopt.plan import (
    AdoptedDisk,
    AdoptedNic,
    AdoptionPlan,
    DiskFormat,
    Firmware,
    adopted_name,
    adopted_network,
    check_macs,
    normalise_mac,
)
from ferry.errors import InvalidInputError

OVF_NAMESPACES = {
    "http://schemas.dmtf.org/ovf/envelope/1": "1.0",
    "http://schemas.dmtf.org/ovf/envelope/2": "2.0",
}
HASHES = {"SHA1": 40, "SHA256": 64, "SHA512": 128}

# CIM resource types (DSP1041) the hardware section uses.
CPU, MEMORY, IDE, SCSI, NIC, FLOPPY, CD, DVD, DISK, SATA, SERIAL, USB, VIDEO, SOUND = (
    3,
    4,
    5,
    6,
    10,
    14,
    15,
    16,
    17,
    20,
    21,
    23,
    24,
    35,
)
_NOTED = {
    FLOPPY: "floppy drive",
    CD: "CD drive",
    DVD: "DVD drive",
    SERIAL: "serial port",
    USB: "USB controller",
    SOUND: "sound card",
    22: "parallel port",
    11: "other network adapter",
    18: "tape drive",
}
_CONTROLLERS = {IDE: "IDE", SCSI: "SCSI", SATA: "SATA"}
_VBOX_FIRMWARE = {
    "efi": "uefi",
    "efi32": "uefi",
    "efi64": "uefi",
    "efidual": "uefi",
    "bios": "bios",
}


@dataclass(frozen=True)
class ManifestEntry:
    algorithm: str
    digest: str


def parse_manifest(data: bytes, *, what: str = "the manifest") -> dict[str, ManifestEntry]:
    """``file -> (algorithm, lower-case hex digest)``; refuses anything else in it."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError(f"{what} is not UTF-8 text") from None
    entries: dict[str, ManifestEntry] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = re.fullmatch(r"\s*([A-Za-z0-9]+)\((.+)\)\s*=\s*([0-9A-Fa-f]+)\s*", line)
        if match is None:
            raise InvalidInputError(f"{what}: line {number} is not ALGORITHM(FILE)= DIGEST")
        algorithm, name, digest = match.group(1).upper(), match.group(2), match.group(3).lower()
        if algorithm not in HASHES:
            raise InvalidInputError(
                f"{what}: line {number} uses {algorithm}; ferry checks {', '.join(HASHES)}"
            )
        if len(digest) != HASHES[algorithm]:
            raise InvalidInputError(
                f"{what}: line {number}: a {algorithm} digest has "
                f"{HASHES[algorithm]} hex digits, not {len(digest)}"
            )
        name = check_relative(name, what=f"{what}: line {number}")
        if name in entries:
            raise InvalidInputError(f"{what} lists {name!r} twice")
        entries[name] = ManifestEntry(algorithm, digest)
    return entries


def allocation_bytes(units: str | None, *, what: str, default: int = 1) -> int:
    """OVF allocation units (``byte * 2^30``, ``MegaBytes``...) as a number of bytes."""
    if units is None or not units.strip():
        return default
    compact = units.replace(" ", "").lower()
    named = {
        "byte": 1,
        "bytes": 1,
        "kilobytes": 1024,
        "megabytes": 1024**2,
        "gigabytes": 1024**3,
        "terabytes": 1024**4,
    }
    if compact in named:
        return named[compact]
    match = re.fullmatch(r"bytes?\*(\d+)(?:\^(\d+))?", compact)
    if match is None:
        raise InvalidInputError(f"{what} has allocation units {units!r} ferry cannot read")
    base, power = int(match.group(1)), int(match.group(2) or 1)
    if power > 60 or base > 1024**4:
        raise InvalidInputError(f"{what} has absurd allocation units {units!r}")
    return int(base**power)


def disk_format(uri: str | None, href: str, *, what: str) -> tuple[DiskFormat, str | None]:
    """A disk's format (and VMDK create type) from its ``ovf:format`` URI."""
    value = (uri or "").strip()
    low = value.lower()
    if "vmdk" in low:
        fragment = value.rsplit("#", 1)[-1] if "#" in value else ""
        if fragment == "streamOptimized":
            return "vmdk", "streamOptimized"
        if fragment in ("sparse", "monolithicSparse"):
            return "vmdk", "monolithicSparse"
        raise InvalidInputError(
            f"{what}: disk {href} is a VMDK of kind {fragment or '?'}; ferry "
            "adopts streamOptimized and monolithicSparse VMDKs"
        )
    for name in ("vdi", "qcow2", "raw"):
        if low.endswith(name) or f"#{name}" in low or f"/{name}" in low:
            return name, None
    if "qcow" in low:
        return "qcow2", None
    raise InvalidInputError(
        f"{what}: disk {href} has a format ferry does not know ({value!r}); "
        "it adopts VMDK (streamOptimized, monolithicSparse), VDI, qcow2 "
        "and raw disks"
    )


def _number(raw: str | None, *, what: str) -> int:
    if raw is None or not raw.strip().isdigit():
        raise InvalidInputError(f"{what} is not a whole number ({raw!r})")
    return int(raw.strip())


def parse_envelope(data: bytes, *, what: str = "the OVF descriptor") -> AdoptionPlan:
    """The plan for the appliance in ``data`` (disk sources are relative hrefs)."""
    root = safe_xml.parse(data, what=what)
    namespace = root.tag[1:].split("}", 1)[0] if root.tag.startswith("{") else ""
    if safe_xml.local(root.tag) != "Envelope" or namespace not in OVF_NAMESPACES:
        raise InvalidInputError(
            f"{what} is not an OVF 1.0 or 2.0 envelope (root "
            f"<{safe_xml.local(root.tag)}> in {namespace or 'no namespace'})"
        )
    notes: list[str] = []
    files = _references(root, what)
    disks_by_id = _disk_section(root, files, what)
    systems = safe_xml.children(root, "VirtualSystem")
    if safe_xml.child(root, "VirtualSystemCollection") is not None or len(systems) != 1:
        raise InvalidInputError(
            f"{what} holds {'a collection of' if not systems else len(systems)}"
            " virtual systems; ferry adopts one VM at a time"
        )
    system = systems[0]
    source_name = safe_xml.text(system, "Name") or safe_xml.attr(system, "id")
    name, name_note = adopted_name(source_name, fallback="appliance")
    label = f"appliance {source_name or '?'}"
    if name_note:
        notes.append(name_note)
    hardware = safe_xml.child(system, "VirtualHardwareSection")
    if hardware is None:
        raise InvalidInputError(f"{what}: {label} has no VirtualHardwareSection")
    default_config = _default_configuration(root)
    cpus, memory = 1, 0
    disks: list[AdoptedDisk] = []
    nics: list[tuple[str, str | None, str]] = []
    buses: set[str] = set()
    controllers: dict[str, int] = {}
    noted: list[str] = []
    items = [
        i for i in hardware if safe_xml.local(i.tag) in ("Item", "StorageItem", "EthernetPortItem")
    ]
    for item in items:
        configuration = safe_xml.attr(item, "configuration")
        if configuration and default_config not in configuration.split():
            continue
        kind = _number(safe_xml.text(item, "ResourceType"), what=f"{label}: a ResourceType")
        instance = safe_xml.text(item, "InstanceID") or ""
        if kind in _CONTROLLERS:
            controllers[instance] = kind
        elif kind == CPU:
            cpus = _number(safe_xml.text(item, "VirtualQuantity"), what=f"{label}'s vCPU count")
        elif kind == MEMORY:
            quantity = _number(safe_xml.text(item, "VirtualQuantity"), what=f"{label}'s memory")
            unit = allocation_bytes(
                safe_xml.text(item, "AllocationUnits"), what=f"{label}'s memory", default=1024**2
            )
            memory = quantity * unit
        elif kind == DISK:
            disk = _hardware_disk(item, disks_by_id, label)
            disks.append(disk)
            parent = safe_xml.text(item, "Parent")
            if parent in controllers:
                buses.add(_CONTROLLERS[controllers[parent]])
        elif kind == NIC:
            network = safe_xml.text(item, "Connection")
            if not network:
                noted.append("an unconnected network adapter")
                continue
            address = safe_xml.text(item, "Address")
            mac = normalise_mac(address, what=label) if address else None
            subtype = (safe_xml.text(item, "ResourceSubType") or "").strip()
            nics.append((network, mac, subtype))
        elif kind in _NOTED:
            noted.append(_NOTED[kind])
    if cpus < 1:
        raise InvalidInputError(f"{what}: {label} asks for {cpus} vCPUs")
    if memory <= 0:
        raise InvalidInputError(f"{what}: {label} names no memory (no item of ResourceType 4)")
    if not disks:
        raise InvalidInputError(f"{what}: {label} has no disk")
    if buses:
        notes.append(
            f"{label}: its disks on {', '.join(sorted(buses))} controllers become "
            "virtio disks (the guest needs virtio-blk drivers)"
        )
    if noted:
        counts = {n: noted.count(n) for n in dict.fromkeys(noted)}
        listed = ", ".join(f"{n} (x{c})" if c > 1 else n for n, c in counts.items())
        notes.append(f"{label}: these devices are not carried over: {listed}")
    firmware = _vmware_config(hardware, label, notes)
    vbox_firmware, vbox_macs = _virtualbox(system, label, notes)
    firmware = vbox_firmware or firmware
    adopted = _nics(nics, vbox_macs, label, notes)
    _sections(root, system, label, notes)
    check_macs(adopted, what=label)
    return AdoptionPlan(
        origin="ovf",
        name=name,
        memory=memory,
        cpus=cpus,
        disks=tuple(disks),
        nics=adopted,
        firmware=firmware,
        not_carried=tuple(notes),
    )


@dataclass(frozen=True)
class _File:
    href: str
    size: int | None


def _references(root: Element, what: str) -> dict[str, _File]:
    files: dict[str, _File] = {}
    references = safe_xml.child(root, "References")
    for element in safe_xml.children(references, "File") if references is not None else []:
        file_id = safe_xml.attr(element, "id") or ""
        href = check_relative(safe_xml.attr(element, "href") or "", what=f"{what}: file {file_id}")
        if safe_xml.attr(element, "compression") or safe_xml.attr(element, "chunkSize"):
            raise InvalidInputError(
                f"{what}: file {href} is compressed or chunked; export the "
                "appliance without compression"
            )
        raw_size = safe_xml.attr(element, "size")
        size = _number(raw_size, what=f"{what}: the size of {href}") if raw_size else None
        if file_id in files:
            raise InvalidInputError(f"{what} declares file id {file_id!r} twice")
        files[file_id] = _File(href, size)
    return files


def _disk_section(root: Element, files: dict[str, _File], what: str) -> dict[str, AdoptedDisk]:
    disks: dict[str, AdoptedDisk] = {}
    section = safe_xml.child(root, "DiskSection")
    for element in safe_xml.children(section, "Disk") if section is not None else []:
        disk_id = safe_xml.attr(element, "diskId") or ""
        units = allocation_bytes(
            safe_xml.attr(element, "capacityAllocationUnits"), what=f"{what}: disk {disk_id}"
        )
        capacity = (
            _number(
                safe_xml.attr(element, "capacity"), what=f"{what}: the capacity of disk {disk_id}"
            )
            * units
        )
        file_ref = safe_xml.attr(element, "fileRef")
        if not file_ref:
            disks[disk_id] = AdoptedDisk(
                source=None, format="qcow2", target=disk_id, capacity=capacity
            )
            continue
        if file_ref not in files:
            raise InvalidInputError(
                f"{what}: disk {disk_id} refers to file {file_ref!r}, which "
                "References does not declare"
            )
        ref = files[file_ref]
        fmt, subformat = disk_format(safe_xml.attr(element, "format"), ref.href, what=what)
        disks[disk_id] = AdoptedDisk(
            source=ref.href,
            format=fmt,
            target=disk_id,
            subformat=subformat,
            file_size=ref.size,
            capacity=capacity,
        )
    return disks


def _default_configuration(root: Element) -> str:
    section = safe_xml.child(root, "DeploymentOptionSection")
    if section is None:
        return ""
    options = safe_xml.children(section, "Configuration")
    for option in options:
        if safe_xml.attr(option, "default") == "true":
            return safe_xml.attr(option, "id") or ""
    return (safe_xml.attr(options[0], "id") or "") if options else ""


def _hardware_disk(item: Element, disks: dict[str, AdoptedDisk], label: str) -> AdoptedDisk:
    resource = safe_xml.text(item, "HostResource") or ""
    match = re.fullmatch(r"(?:ovf:)?/disk/(.+)", resource)
    if match is None:
        raise InvalidInputError(
            f"{label}: a disk drive refers to {resource!r}; ferry adopts "
            "disks of the DiskSection (ovf:/disk/ID)"
        )
    disk_id = match.group(1)
    if disk_id not in disks:
        raise InvalidInputError(
            f"{label}: a disk drive refers to disk {disk_id!r}, which the "
            "DiskSection does not declare"
        )
    return disks[disk_id]


def _vmware_config(hardware: Element, label: str, notes: list[str]) -> Firmware:
    firmware: Firmware = "bios"
    extra: list[str] = []
    for element in hardware:
        if safe_xml.local(element.tag) not in ("Config", "ExtraConfig"):
            continue
        key = safe_xml.attr(element, "key") or ""
        value = safe_xml.attr(element, "value") or ""
        if key == "firmware":
            firmware = "uefi" if value.lower() == "efi" else "bios"
        elif key == "uefi.secureBoot.enabled" and value.lower() == "true":
            notes.append(f"{label}: UEFI Secure Boot is not carried over")
        elif safe_xml.local(element.tag) == "ExtraConfig" or key.startswith(("tools.", "cpu")):
            extra.append(key)
    if extra:
        notes.append(
            f"{label}: VMware settings ({', '.join(sorted(set(extra)))}) are not carried over"
        )
    return firmware


def _virtualbox(system: Element, label: str, notes: list[str]) -> tuple[Firmware | None, list[str]]:
    """VirtualBox's own machine section: firmware and the enabled adapters' MACs."""
    machine = safe_xml.child(system, "Machine")
    hardware = safe_xml.child(machine, "Hardware") if machine is not None else None
    if hardware is None:
        return None, []
    firmware: Firmware | None = None
    element = safe_xml.child(hardware, "Firmware")
    if element is not None:
        kind = (element.get("type") or "BIOS").lower()
        firmware = "uefi" if _VBOX_FIRMWARE.get(kind) == "uefi" else "bios"
    macs: list[str] = []
    network = safe_xml.child(hardware, "Network")
    adapters = safe_xml.children(network, "Adapter") if network is not None else []
    for adapter in sorted(adapters, key=lambda a: int(a.get("slot", "0") or 0)):
        if adapter.get("enabled", "false") == "true" and adapter.get("MACAddress"):
            macs.append(normalise_mac(adapter.get("MACAddress", ""), what=label))
    if safe_xml.child(hardware, "SharedFolders") is not None:
        notes.append(f"{label}: VirtualBox shared folders are not carried over")
    return firmware, macs


_NIC_MODELS = {
    "virtio": "virtio",
    "e1000": "e1000",
    "e1000e": "e1000e",
    "82540em": "e1000",
    "82545em": "e1000",
    "82543gc": "e1000",
    "rtl8139": "rtl8139",
}


def _nics(
    found: list[tuple[str, str | None, str]], vbox_macs: list[str], label: str, notes: list[str]
) -> tuple[AdoptedNic, ...]:
    nics = []
    for index, (network, mac, subtype) in enumerate(found):
        if mac is None and len(vbox_macs) == len(found):
            mac = vbox_macs[index]
        model = _NIC_MODELS.get(subtype.lower().replace("-", ""))
        if model is None:
            model = "virtio"
            if subtype:
                notes.append(
                    f"{label}: the {subtype} adapter on {network} becomes a virtio NIC "
                    "(the guest needs virtio-net drivers)"
                )
        nics.append(AdoptedNic(network=adopted_network(network, notes), mac=mac, model=model))
    if any(n.mac is None for n in nics):
        notes.append(f"{label}: the descriptor gives some NICs no MAC; ferry makes new ones")
    return tuple(nics)


def _sections(root: Element, system: Element, label: str, notes: list[str]) -> None:
    if safe_xml.child(system, "ProductSection") is not None:
        notes.append(f"{label}: its product properties (ProductSection) are not carried over")
    if safe_xml.child(system, "EulaSection") is not None:
        notes.append(
            f"{label}: it has a licence agreement (EulaSection) that ferry does not "
            "show; read it in the descriptor"
        )
    if safe_xml.child(system, "StartupSection") is not None:
        notes.append(f"{label}: its start-up order (StartupSection) is not carried over")
    if safe_xml.child(root, "DeploymentOptionSection") is not None:
        notes.append(f"{label}: of its deployment options, the default one is adopted")
