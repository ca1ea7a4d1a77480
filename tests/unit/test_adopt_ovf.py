"""The OVF descriptor, manifest and OVA member rules, on VMware's and VirtualBox's shapes."""

from __future__ import annotations

import pytest

from ferry.core.adopt.ova import TarEntry, check_entries, check_relative, descriptor
from ferry.core.adopt.ovf import allocation_bytes, parse_envelope, parse_manifest
from ferry.errors import InvalidInputError
from tests.unit.adopt_samples import VIRTUALBOX_OVF, VMWARE_OVF

SHA1 = "a" * 40
SHA256 = "b" * 64


def vmware(**values: object) -> bytes:
    fields: dict[str, object] = {"disk": "app-server-disk1.vmdk", "size": 1310720,
                                 "capacity_mib": 1024, "memory_mib": 2048,
                                 "mac": "00:50:56:8a:2b:3c", "firmware": "efi"}  # fmt: skip
    fields.update(values)
    return VMWARE_OVF.format(**fields).encode()


def virtualbox(**values: object) -> bytes:
    fields: dict[str, object] = {"disk": "Debian 12 (desktop)-disk001.vmdk",
                                 "capacity": 8 * 1024**3, "memory_mib": 1024,
                                 "mac": "080027A1B2C3", "firmware": "BIOS"}  # fmt: skip
    fields.update(values)
    return VIRTUALBOX_OVF.format(**fields).encode()


def test_a_vmware_ovf_1_0_becomes_a_plan() -> None:
    plan = parse_envelope(vmware())
    assert plan.origin == "ovf"
    assert (plan.name, plan.cpus, plan.memory, plan.firmware) == ("app-server", 2, 2 * 1024**3,
                                                                  "uefi")  # fmt: skip
    [disk] = plan.disks
    assert (disk.source, disk.format, disk.subformat) == ("app-server-disk1.vmdk", "vmdk",
                                                          "streamOptimized")  # fmt: skip
    assert (disk.file_size, disk.capacity) == (1310720, 1024**3)
    [nic] = plan.nics
    assert (nic.network, nic.mac, nic.model) == ("VM-Network", "00:50:56:8a:2b:3c", "virtio")
    notes = "\n".join(plan.not_carried)
    for expected in ("SCSI controllers become virtio disks", "CD drive", "VmxNet3 adapter",
                     "ProductSection", "VMware settings", "svga.autodetect",
                     "--network-map VM-Network=NETWORK"):  # fmt: skip
        assert expected in notes, expected


def test_a_virtualbox_ovf_2_0_becomes_a_plan() -> None:
    plan = parse_envelope(virtualbox(firmware="EFI"))
    assert plan.name == "Debian-12-desktop"
    assert (plan.cpus, plan.memory, plan.firmware) == (1, 1024**3, "uefi")
    [disk] = plan.disks
    assert disk.source == "Debian 12 (desktop)-disk001.vmdk"
    assert (disk.file_size, disk.capacity) == (None, 8 * 1024**3)
    # The MAC of the enabled adapter, from VirtualBox's own machine section.
    [nic] = plan.nics
    assert (nic.network, nic.mac, nic.model) == ("NAT", "08:00:27:a1:b2:c3", "e1000")
    notes = "\n".join(plan.not_carried)
    for expected in ("'Debian 12 (desktop)' is not a ferry VM name", "SATA controllers",
                     "sound card", "CD drive", "shared folders"):  # fmt: skip
        assert expected in notes, expected
    assert parse_envelope(virtualbox()).firmware == "bios"


@pytest.mark.parametrize(
    "href",
    ["../../etc/passwd", "/etc/shadow", "disks/../../x.vmdk", "file:///etc/passwd",
     "http://example.invalid/a.vmdk", "a\\..\\b.vmdk", "./x.vmdk", ""],
)  # fmt: skip
def test_a_disk_path_that_climbs_out_of_the_folder_is_refused(href: str) -> None:
    with pytest.raises(InvalidInputError, match=r"(climbs out|absolute|plain relative)"):
        parse_envelope(vmware(disk=href))


def test_entities_in_an_ovf_are_refused() -> None:
    document = vmware().replace(
        b"<Envelope vmw:buildId",
        b'<!DOCTYPE Envelope [<!ENTITY x SYSTEM "file:///etc/passwd">]>\n<Envelope vmw:buildId',
    )
    with pytest.raises(InvalidInputError, match="DTD or entities"):
        parse_envelope(document)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (b"vmdk.html#streamOptimized", b"vmdk.html#monolithicFlat", "monolithicFlat"),
        (b"vmdk.html#streamOptimized", b"http://example.invalid/vhdx", "does not know"),
        (b'ovf:fileRef="file1"', b'ovf:fileRef="file9"', "file9"),
        (b"ovf:/disk/vmdisk1", b"ovf:/disk/vmdisk7", "vmdisk7"),
        (b"ovf:/disk/vmdisk1", b"ovf:/file/file1", "ovf:/file/file1"),
        (b"envelope/1", b"envelope/9", "not an OVF 1.0 or 2.0"),
        (b'ovf:id="file1"', b'ovf:id="file1" ovf:compression="gzip"', "compressed"),
        (
            b"<rasd:ResourceType>4</rasd:ResourceType>",
            b"<rasd:ResourceType>1</rasd:ResourceType>",
            "no memory",
        ),
        (
            b"<VirtualSystem ",
            b"<VirtualSystemCollection ovf:id='x'/><VirtualSystem ",
            "one VM at a time",
        ),
    ],
)
def test_unsupported_appliances_are_refused_in_one_line(old: bytes, new: bytes,
                                                        message: str) -> None:  # fmt: skip
    document = vmware()
    assert old in document
    with pytest.raises(InvalidInputError, match=message) as caught:
        parse_envelope(document.replace(old, new, 1))
    assert "\n" not in str(caught.value)


def test_manifests_as_vmware_and_virtualbox_write_them() -> None:
    text = f"SHA256(app.ovf)= {SHA256}\nSHA1(disk1.vmdk) = {SHA1.upper()}\n\n"
    entries = parse_manifest(text.encode())
    assert entries["app.ovf"].algorithm == "SHA256"
    assert entries["disk1.vmdk"].digest == SHA1
    for bad, message in [
        (f"MD5(a.ovf)= {'c' * 32}", "uses MD5"),
        (f"SHA256(a.ovf)= {SHA1}", "64 hex digits"),
        (f"SHA1(../etc/passwd)= {SHA1}", "climbs out"),
        (f"SHA1(a)= {SHA1}\nSHA1(a)= {SHA1}", "twice"),
        ("just some text", "not ALGORITHM"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            parse_manifest(bad.encode())


def test_allocation_units() -> None:
    assert allocation_bytes("byte * 2^30", what="x") == 1024**3
    assert allocation_bytes("byte*2^20", what="x") == 1024**2
    assert allocation_bytes("MegaBytes", what="x") == 1024**2
    assert allocation_bytes(None, what="x") == 1
    with pytest.raises(InvalidInputError, match="cannot read"):
        allocation_bytes("furlongs", what="x")


def test_ova_members_must_be_plain_files_inside_the_appliance() -> None:
    good = [TarEntry("app.ovf", "file", 10), TarEntry("app.mf", "file", 10),
            TarEntry("app-disk1.vmdk", "file", 10)]  # fmt: skip
    files = check_entries(good, what="app.ova")
    assert descriptor(files, what="app.ova") == "app.ovf"
    for bad, message in [
        (TarEntry("app-disk1.vmdk", "symlink", 0, "/etc/shadow"), "symbolic link"),
        (TarEntry("x.vmdk", "hardlink", 0, "app.ovf"), "hard link"),
        (TarEntry("dev", "other", 0), "special file"),
        (TarEntry("/etc/cron.d/x", "file", 1), "absolute"),
        (TarEntry("../../root/.ssh/authorized_keys", "file", 1), "climbs out"),
        (TarEntry("app.ovf", "file", 1), "appears twice"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            check_entries([*good, bad], what="app.ova")
    with pytest.raises(InvalidInputError, match=r"holds 2 \.ovf"):
        descriptor(check_entries([*good, TarEntry("b.ovf", "file", 1)], what="a"), what="a")
    assert check_relative("sub/disk.vmdk", what="x") == "sub/disk.vmdk"
