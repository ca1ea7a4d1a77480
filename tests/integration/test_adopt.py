"""Adopting VMs made elsewhere, for real: a libvirt domain and an OVA built here
from the test guest's disks boot as ferry VMs; each hostile or broken file is
refused in one line and leaves nothing registered."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ferry.guest.bootable import build_boot_image
from ferry.guest.build import GuestArtifacts, ensure_guest
from ferry.guest.records import read_records
from tests.conftest import UP, Cli, LabEnv, lab_session
from tests.unit.adopt_samples import BILLION_LAUGHS, DOMAIN, EXTERNAL_ENTITY

pytestmark = pytest.mark.integration

BOOT_TIMEOUT = 180  # TCG under the load of other workers' guests


@dataclass
class Seed:
    """A stopped test guest's disk in the lab's image dir, and its last record."""

    env: LabEnv
    disk: Path
    last: int
    images: Path
    guest: GuestArtifacts


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory, guest_cache: Path) -> Iterator[Seed]:
    with lab_session(tmp_path_factory.mktemp("adopt")) as env:
        env.lab.up(1)
        cli = env.cli
        cli(
            "vm",
            "create",
            "seed",
            "--host",
            "host-1",
            "--guest",
            "test",
            "--memory",
            "128M",
            "--disk",
            "32M",
            "--start",
        )
        env.wait_console("seed", lambda t: "seq 3\n" in t, timeout=BOOT_TIMEOUT)
        cli("vm", "stop", "seed", "--timeout", "30s")
        source = Path(env.vm("seed")["disks"][0]["path"])
        last = read_records(source).last_seq
        images = env.lab.images_dir
        disk = images / "seed.qcow2"
        img("convert", "-f", "qcow2", "-O", "qcow2", str(source), str(disk))
        cli("vm", "delete", "seed")
        yield Seed(env=env, disk=disk, last=last, images=images, guest=ensure_guest(guest_cache))


def img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def registered(env: LabEnv) -> tuple[list[str], set[str]]:
    """The VMs host-1 lists, and the VM dirs in its data dir."""
    names = sorted(vm["name"] for vm in env.cli.json("vm", "list", "--host", "host-1"))
    vms = env.lab.host(1).data_dir / "vms"
    return names, {p.name for p in vms.iterdir()} if vms.exists() else set()


def up_seq(env: LabEnv, name: str) -> int:
    text = env.wait_console(name, lambda t: bool(UP.search(t)), timeout=BOOT_TIMEOUT)
    return int(UP.findall(text)[0])


LOADER = "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>"


def domain_xml(seed: Seed, name: str, **changes: str) -> Path:
    """The sample virsh dumpxml, made bootable here: UEFI (OVMF) with the test guest's
    kernel, the seed's disk as vda (qcow2), a fresh raw disk on SATA, CPU model qemu64."""
    kernel, initrd = seed.images / "vmlinuz", seed.images / "initrd.img"
    if not kernel.exists():
        shutil.copyfile(seed.guest.kernel, kernel)
        shutil.copyfile(seed.guest.initrd, initrd)
    data = seed.images / f"{name}-data.img"
    with data.open("wb") as handle:
        handle.truncate(16 * 1024**2)
    root = seed.images / f"{name}.qcow2"
    img("convert", "-f", "qcow2", "-O", "qcow2", str(seed.disk), str(root))
    text = DOMAIN.format(root=root, data=data)
    replacements = {
        "<name>web01</name>": f"<name>{name}</name>",
        "<memory unit='KiB'>2097152</memory>": "<memory unit='MiB'>192</memory>",
        "<currentMemory unit='KiB'>1048576</currentMemory>": "",
        "<vcpu placement='static'>2</vcpu>": "<vcpu placement='static'>1</vcpu>",
        LOADER: f"{LOADER}<kernel>{kernel}</kernel><initrd>{initrd}</initrd>"
        f"<cmdline>{seed.guest.append}</cmdline>",
        "Skylake-Client-IBRS": "qemu64",
        **changes,
    }
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    path = seed.images / f"{name}.xml"
    path.write_text(text)
    return path


DOMAIN_MAP = ("--network-map", "default=lab", "--network-map", "br-storage=lab")
OVA_MAP = ("--network-map", "NAT=lab")


def adopt(cli: Cli, *args: str) -> dict[str, Any]:
    """``vm import ARGS --host host-1 --json``: its final result line."""
    out = cli("vm", "import", *args, "--host", "host-1", "--json").stdout
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    assert result["result"] == "ok"
    return result


def test_a_libvirt_domain_is_adopted_and_boots(seed: Seed) -> None:
    env, cli = seed.env, seed.env.cli
    xml = domain_xml(seed, "web01")
    # The domain's networks are not on this host until mapped.
    line = cli.fails("vm", "import", "--libvirt", str(xml), "--host", "host-1")
    assert "has no network 'default'" in line and "--network-map default=NETWORK" in line
    assert registered(env) == ([], set())
    result = adopt(cli, "--libvirt", str(xml), *DOMAIN_MAP)
    assert result["result"] == "ok" and result["vm"] == "web01"
    assert result["uuid"] == "7d8f2e3a-5b41-4c9e-9f0a-2b6d1c3e4f50"
    notes = "\n".join(result["notes"])
    for expected in (
        "cdrom sdb",
        "bus sata becomes a virtio disk",
        "SPICE",
        "CPU feature changes (md-clear)",
        "sound",
        "rng",
        "redirdev",
        "UEFI variables (<nvram>) are not carried over",
    ):
        assert expected in notes, expected
    assert (result["firmware"], result["disks"]) == ("uefi", 2)
    vm = env.vm("web01")
    assert (vm["firmware"], vm["cpu_model"]) == ("uefi", "qemu64")
    assert (vm["memory"], vm["cpus"]) == (192 * 1024**2, 1)
    assert [(n["network"], n["mac"], n["model"]) for n in vm["nics"]] == [
        ("lab", "52:54:00:6b:3c:58", "virtio"),
        ("lab", "52:54:00:aa:10:02", "e1000e"),
    ]
    # Its two disks, then its own UEFI variable store (a fresh one from OVMF's template).
    assert [(d["format"], d.get("firmware", False)) for d in vm["disks"]] == [
        ("qcow2", False), ("qcow2", False), ("qcow2", True)]  # fmt: skip
    assert all(Path(d["path"]).is_relative_to(env.lab.host(1).data_dir) for d in vm["disks"])
    assert vm["disks"][1]["size"] == 16 * 1024**2
    # The adopted copy is the VM's own: the source files are left as they were.
    cli("vm", "start", "web01")
    assert up_seq(env, "web01") == seed.last
    assert "ferry-guest efi-boots=1" in env.console("web01")  # booted through OVMF
    env.wait_console("web01", lambda t: f"seq {seed.last + 2}\n" in t, timeout=BOOT_TIMEOUT)
    cli("vm", "kill", "web01")
    assert read_records(seed.images / "web01.qcow2").last_seq == seed.last
    # The same domain again: its UUID is taken now.
    line = cli.fails(
        "vm", "import", "--libvirt", str(xml), "--host", "host-1", "--name", "again", *DOMAIN_MAP
    )
    assert "adopted or imported already" in line
    cli("vm", "delete", "web01", "--force")


OVF = """<?xml version="1.0"?>
<Envelope ovf:version="1.0" xml:lang="en-US" xmlns="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
  xmlns:vbox="http://www.virtualbox.org/ovf/machine">
  <References>
    <File ovf:id="file1" ovf:href="{boot}" ovf:size="{boot_size}"/>
    <File ovf:id="file2" ovf:href="{data}" ovf:size="{data_size}"/>
  </References>
  <DiskSection>
    <Info>List of the virtual disks used in the package</Info>
    <Disk ovf:capacity="{boot_capacity}" ovf:diskId="vmdisk1" ovf:fileRef="file1"
      ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
    <Disk ovf:capacity="32" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk2"
      ovf:fileRef="file2"
      ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#{data_kind}"/>
  </DiskSection>
  <NetworkSection>
    <Info>Logical networks used in the package</Info>
    <Network ovf:name="NAT"><Description>The appliance's network</Description></Network>
  </NetworkSection>
  <VirtualSystem ovf:id="{name}">
    <Info>A virtual machine</Info>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements for a virtual machine</Info>
      <System><vssd:VirtualSystemType>virtualbox-2.2</vssd:VirtualSystemType></System>
      <Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits>
        <rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>192</rasd:VirtualQuantity></Item>
      <Item><rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>AHCI</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType></Item>
      <Item><rasd:Connection>NAT</rasd:Connection><rasd:InstanceID>4</rasd:InstanceID>
        <rasd:ResourceSubType>E1000</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType></Item>
      <Item><rasd:HostResource>/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:HostResource>/disk/vmdisk2</rasd:HostResource>
        <rasd:InstanceID>6</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:InstanceID>7</rasd:InstanceID><rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>15</rasd:ResourceType></Item>
    </VirtualHardwareSection>
    <vbox:Machine ovf:required="false" version="1.19-linux" name="{name}">
      <ovf:Info>Complete VirtualBox machine configuration in VirtualBox format</ovf:Info>
      <Hardware><Firmware type="BIOS"/><Network>
        <Adapter slot="0" enabled="true" MACAddress="080027A1B2C3" type="82540EM"><NAT/></Adapter>
      </Network></Hardware>
    </vbox:Machine>
  </VirtualSystem>
</Envelope>
"""


@dataclass
class Parts:
    """An appliance's files (name -> bytes) and the name of its descriptor."""

    files: dict[str, bytes]
    ovf: str


def appliance(
    seed: Seed,
    name: str,
    *,
    file_kind: str = "monolithicSparse",
    ovf_changes: dict[str, str] | None = None,
) -> Parts:
    """A VirtualBox-shaped appliance: a bootable streamOptimized VMDK of the test guest
    and the seed's records as a second VMDK (the descriptor says monolithicSparse; the
    file is ``file_kind``), with a SHA256 manifest."""
    work = seed.images / f".{name}-parts"
    work.mkdir(exist_ok=True)
    raw = build_boot_image(work / "boot.img", seed.guest, tag=name)
    boot, data = f"{name}-disk001.vmdk", f"{name}-disk002.vmdk"
    img(
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        str(raw),
        str(work / boot),
    )
    img(
        "convert",
        "-f",
        "qcow2",
        "-O",
        "vmdk",
        "-o",
        f"subformat={file_kind}",
        str(seed.disk),
        str(work / data),
    )
    files = {boot: (work / boot).read_bytes(), data: (work / data).read_bytes()}
    text = OVF.format(
        boot=boot,
        data=data,
        boot_size=len(files[boot]),
        data_size=len(files[data]),
        boot_capacity=raw.stat().st_size,
        name=name,
        data_kind="monolithicSparse",
    )
    for old, new in (ovf_changes or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    descriptor = f"{name}.ovf"
    files = {descriptor: text.encode(), **files}
    files[f"{name}.mf"] = "".join(
        f"SHA256({n}) = {hashlib.sha256(d).hexdigest()}\n" for n, d in files.items()
    ).encode()
    return Parts(files=files, ovf=descriptor)


def write_ova(path: Path, parts: Parts, extra: tuple[tarfile.TarInfo, ...] = ()) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in parts.files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return path


def test_an_ova_is_adopted_and_boots_from_its_disk(seed: Seed) -> None:
    env, cli = seed.env, seed.env.cli
    ova = write_ova(seed.images / "appliance.ova", appliance(seed, "appliance"))
    result = adopt(cli, "--ovf", str(ova), *OVA_MAP)
    assert result["vm"] == "appliance" and result["disks"] == 2
    notes = "\n".join(result["notes"])
    assert "SATA controllers become virtio disks" in notes and "CD drive" in notes
    vm = env.vm("appliance")
    assert [(n["network"], n["mac"], n["model"]) for n in vm["nics"]] == [
        ("lab", "08:00:27:a1:b2:c3", "e1000")
    ]
    assert vm["kernel"] is None and [d["format"] for d in vm["disks"]] == ["qcow2", "qcow2"]
    # Nothing of the OVA is left next to the VM's disks (the extracted VMDKs are gone).
    vm_dir = Path(vm["disks"][0]["path"]).parent
    assert sorted(p.name for p in vm_dir.iterdir() if p.suffix in (".vmdk", ".qcow2", "")) == [
        "disk0.qcow2",
        "disk1.qcow2",
    ]
    cli("vm", "start", "appliance")
    text = env.wait_console("appliance", lambda t: bool(UP.search(t)), timeout=BOOT_TIMEOUT)
    assert "ferry-guest booted tag=appliance" in text
    assert int(UP.findall(text)[0]) == seed.last
    cli("vm", "kill", "appliance")
    cli("vm", "delete", "appliance", "--force")


def test_each_hostile_or_broken_file_is_refused_and_nothing_is_registered(seed: Seed) -> None:
    env, cli = seed.env, seed.env.cli
    before = registered(env)
    images = seed.images

    def refused(*args: str) -> str:
        line = cli.fails("vm", "import", *args, "--host", "host-1")
        assert registered(env) == before, f"{args}: something was left"
        return line

    good = domain_xml(seed, "typo")
    assert "not both" in refused("--libvirt", str(good), "--ovf", str(good))
    assert "--mode applies to export folders" in refused("--libvirt", str(good), "--mode",
                                                         "register")  # fmt: skip
    line = refused("--libvirt", str(good), *DOMAIN_MAP, "--network-map", "nothere=lab")
    assert "names network 'nothere', which VM 'typo' does not use" in line
    for name, document in (("entity", EXTERNAL_ENTITY), ("laughs", BILLION_LAUGHS)):
        (images / f"{name}.xml").write_bytes(document)
        assert "DTD or entities" in refused("--libvirt", str(images / f"{name}.xml"))
    source = "<source file='" + str(images / "outside-data.img")
    outside = domain_xml(seed, "outside", **{source: "<source file='/etc/hostname"})
    assert "outside the allowed image dirs" in refused("--libvirt", str(outside), *DOMAIN_MAP)
    assert "has no network 'nowhere'" in refused(
        "--libvirt",
        str(good),
        "--network-map",
        "default=nowhere",
        "--network-map",
        "br-storage=lab",
    )
    # A CPU model this host's QEMU knows but cannot run (TCG lacks its features).
    skylake = domain_xml(seed, "skylake", **{"qemu64</model>": "Skylake-Client-IBRS</model>"})
    line = refused("--libvirt", str(skylake), *DOMAIN_MAP)
    assert "cannot run CPU model 'Skylake-Client-IBRS': it lacks features" in line
    # A raw disk the domain calls qcow2: opened as qcow2 (never probed), it is not one.
    declared = "type='raw'/>\n      <source file='" + str(images / "liar-data.img")
    liar = domain_xml(seed, "liar", **{declared: declared.replace("'raw'", "'qcow2'")})
    assert "is not a qcow2 image" in refused("--libvirt", str(liar), *DOMAIN_MAP)

    parts = appliance(seed, "hostile")
    # An OVF whose disk climbs out of its folder.
    folder = images / "climbing"
    folder.mkdir()
    climbing = parts.files[parts.ovf].replace(
        b'ovf:href="hostile-disk002.vmdk"', b'ovf:href="../hostile-disk002.vmdk"'
    )
    (folder / "hostile.ovf").write_bytes(climbing)
    assert "climbs out" in refused("--ovf", str(folder / "hostile.ovf"), *OVA_MAP)
    # An OVA with a symlink in it.
    link = tarfile.TarInfo("hostile-disk003.vmdk")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
    ova = write_ova(images / "symlink.ova", parts, (link,))
    assert "symbolic link" in refused("--ovf", str(ova), *OVA_MAP)
    # A tampered disk: the manifest's checksum no longer matches (found by the job).
    disk = "hostile-disk002.vmdk"
    tampered = Parts(files=dict(parts.files), ovf=parts.ovf)
    body = bytearray(tampered.files[disk])
    body[len(body) // 2] ^= 0xFF
    tampered.files[disk] = bytes(body)
    ova = write_ova(images / "tampered.ova", tampered)
    line = refused("--ovf", str(ova), *OVA_MAP)
    assert "does not match its SHA256 checksum" in line
    # A size that is not the descriptor's, in a folder appliance.
    folder = images / "sizes"
    folder.mkdir()
    for name, data in parts.files.items():
        (folder / name).write_bytes(data + (b"\0" * 512 if name == disk else b""))
    assert "the descriptor says" in refused("--ovf", str(folder / "hostile.ovf"), *OVA_MAP)
    # A VMDK text descriptor naming a host file as its extent (no manifest, sizes right):
    # refused by its header, before qemu-img would open the extent.
    folder = images / "descriptor"
    folder.mkdir()
    evil = b'# Disk DescriptorFile\ncreateType="monolithicFlat"\nRW 2 FLAT "/etc/shadow" 0\n'
    old_size = f'ovf:size="{len(parts.files[disk])}"'.encode()
    ovf = parts.files[parts.ovf].replace(old_size, f'ovf:size="{len(evil)}"'.encode())
    (folder / parts.ovf).write_bytes(ovf)
    (folder / disk).write_bytes(evil)
    (folder / "hostile-disk001.vmdk").write_bytes(parts.files["hostile-disk001.vmdk"])
    assert "is a text descriptor" in refused("--ovf", str(folder / parts.ovf), *OVA_MAP)
    # A VMDK of another kind than the descriptor declares (qemu-img, opened as vmdk).
    ova = write_ova(images / "kind.ova", appliance(seed, "kind", file_kind="streamOptimized"))
    assert "VMDK; the descriptor says monolithicSparse" in refused("--ovf", str(ova), *OVA_MAP)
