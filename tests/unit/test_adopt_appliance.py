"""Appliances on disk (an OVF folder, an OVA tar): sizes, manifest checksums and
tar members are checked before anything is made of them (real files, no QEMU)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from ferry.errors import InvalidInputError
from ferry.host.appliance import open_appliance
from tests.unit.adopt_samples import VMWARE_OVF

DISK = b"KDMV" + bytes(range(256)) * 64  # any bytes: only sizes and digests are read here


def descriptor(disk: str = "app-disk1.vmdk", size: int = len(DISK)) -> bytes:
    return VMWARE_OVF.format(disk=disk, size=size, capacity_mib=64, memory_mib=256,
                             mac="00:50:56:8a:2b:3c", firmware="bios").encode()  # fmt: skip


def manifest(files: dict[str, bytes], algorithm: str = "SHA256") -> bytes:
    lines = [f"{algorithm}({name})= {hashlib.new(algorithm.lower(), data).hexdigest()}"
             for name, data in files.items()]  # fmt: skip
    return ("\n".join(lines) + "\n").encode()


def folder(tmp_path: Path, *, disk: bytes = DISK, mf: bytes | None = None,
           ovf: bytes | None = None) -> Path:  # fmt: skip
    ovf = ovf if ovf is not None else descriptor()
    (tmp_path / "app.ovf").write_bytes(ovf)
    (tmp_path / "app-disk1.vmdk").write_bytes(disk)
    if mf is None:
        mf = manifest({"app.ovf": ovf, "app-disk1.vmdk": DISK})
    (tmp_path / "app.mf").write_bytes(mf)
    return tmp_path / "app.ovf"


def ova(path: Path, members: list[tuple[str, bytes | None, str]]) -> Path:
    """A tar of (name, data, kind) members: a file, or a symlink/hardlink (data: its target)."""
    with tarfile.open(path, "w") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                assert data is not None
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                info.linkname = (data or b"").decode()
                tar.addfile(info)
    return path


def good_members() -> list[tuple[str, bytes | None, str]]:
    ovf = descriptor()
    return [("app.ovf", ovf, "file"),
            ("app.mf", manifest({"app.ovf": ovf, "app-disk1.vmdk": DISK}, "SHA1"), "file"),
            ("app-disk1.vmdk", DISK, "file")]  # fmt: skip


def test_a_folder_appliance_is_checked_and_staged(tmp_path: Path) -> None:
    appliance = open_appliance(folder(tmp_path))
    [disk] = appliance.disks
    assert disk.path == tmp_path / "app-disk1.vmdk" and disk.digest is not None
    seen: list[int] = []
    assert appliance.stage(tmp_path, seen.append) == [tmp_path / "app-disk1.vmdk"]
    assert sum(seen) == len(DISK)


def test_an_ova_is_checked_and_its_disks_extracted(tmp_path: Path) -> None:
    source = ova(tmp_path / "app.ova", good_members())
    appliance = open_appliance(source)
    staging = tmp_path / "staging"
    staging.mkdir()
    [path] = appliance.stage(staging, lambda n: None)
    assert path is not None and path.read_bytes() == DISK and path.parent == staging


def test_a_tampered_disk_fails_its_manifest_checksum(tmp_path: Path) -> None:
    tampered = DISK[:-1] + b"\x00"
    appliance = open_appliance(folder(tmp_path, disk=tampered))
    with pytest.raises(InvalidInputError, match="does not match its SHA256 checksum"):
        appliance.stage(tmp_path, lambda n: None)
    members = good_members()
    members[2] = ("app-disk1.vmdk", tampered, "file")
    staged = open_appliance(ova(tmp_path / "t.ova", members))
    with pytest.raises(InvalidInputError, match="does not match its SHA1 checksum"):
        staged.stage(tmp_path, lambda n: None)


def test_a_tampered_descriptor_or_a_manifest_that_leaves_a_file_out(tmp_path: Path) -> None:
    ovf = descriptor()
    edited = ovf.replace(b"<rasd:VirtualQuantity>2<", b"<rasd:VirtualQuantity>8<")
    mf = manifest({"app.ovf": ovf, "app-disk1.vmdk": DISK})
    with pytest.raises(InvalidInputError, match=r"app\.ovf does not match its SHA256"):
        open_appliance(folder(tmp_path, ovf=edited, mf=mf))
    with pytest.raises(InvalidInputError, match=r"no checksum of app-disk1\.vmdk"):
        open_appliance(folder(tmp_path, mf=manifest({"app.ovf": ovf})))


def test_a_size_mismatch_is_refused(tmp_path: Path) -> None:
    ovf = descriptor(size=len(DISK) + 512)
    with pytest.raises(InvalidInputError, match=f"is {len(DISK)} bytes, the descriptor says"):
        open_appliance(
            folder(tmp_path, ovf=ovf, mf=manifest({"app.ovf": ovf, "app-disk1.vmdk": DISK}))
        )


def test_an_ova_with_a_symlink_or_hard_link_is_refused(tmp_path: Path) -> None:
    for kind, message in (("symlink", "symbolic link"), ("hardlink", "hard link")):
        members = good_members()
        members[2] = ("app-disk1.vmdk", b"/etc/shadow", kind)
        with pytest.raises(InvalidInputError, match=message):
            open_appliance(ova(tmp_path / f"{kind}.ova", members))
    members = [*good_members(), ("../../evil", b"x", "file")]
    with pytest.raises(InvalidInputError, match="climbs out"):
        open_appliance(ova(tmp_path / "climb.ova", members))


def test_a_folder_disk_that_is_a_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.vmdk"
    outside.write_bytes(DISK)
    inner = tmp_path / "appliance"
    inner.mkdir()
    ovf = folder(inner)
    (inner / "app-disk1.vmdk").unlink()
    (inner / "app-disk1.vmdk").symlink_to(outside)
    with pytest.raises(InvalidInputError, match="outside the appliance's folder"):
        open_appliance(ovf)
    (inner / "app-disk1.vmdk").unlink()
    (inner / "app-disk1.vmdk").symlink_to("app.mf")
    with pytest.raises(InvalidInputError, match="not a regular file"):
        open_appliance(ovf)


def test_an_ova_that_is_not_a_tar(tmp_path: Path) -> None:
    bad = tmp_path / "x.ova"
    bad.write_bytes(b"\x1f\x8b" + b"\x00" * 600)
    with pytest.raises(InvalidInputError, match="not an OVA"):
        open_appliance(bad)
