"""Disk headers judged before qemu-img opens a foreign image."""

from __future__ import annotations

import struct

import pytest

from ferry.core.adopt.headers import check_header
from ferry.errors import InvalidInputError


def qcow2(*, version: int = 3, backing: int = 0, incompatible: int = 0) -> bytes:
    head = b"QFI\xfb" + struct.pack(">IQ", version, backing) + bytes(56)  # to offset 72
    return head + struct.pack(">Q", incompatible) + bytes(512 - 80)


def vdi() -> bytes:
    return (
        b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(64, b"\0")
        + struct.pack("<I", 0xBEDA107F)
        + bytes(444)
    )


def test_self_contained_images_of_the_declared_kind_pass() -> None:
    check_header("qcow2", qcow2(), what="d")
    check_header("qcow2", qcow2(version=2), what="d")
    check_header("vmdk", b"KDMV" + bytes(508), what="d")
    check_header("vdi", vdi(), what="d")
    check_header("raw", b"QFI\xfb anything", what="d")


@pytest.mark.parametrize(
    ("fmt", "head", "message"),
    [
        ("vmdk", b'# Disk DescriptorFile\nRW 8 FLAT "/etc/shadow" 0\n', "text descriptor"),
        ("vmdk", b"QFI\xfb" + bytes(508), "not a sparse VMDK"),
        ("qcow2", b"KDMV" + bytes(508), "not a qcow2"),
        ("qcow2", qcow2(backing=4096), "backing file"),
        ("qcow2", qcow2(incompatible=1 << 2), "another file"),
        ("vdi", b"KDMV" + bytes(508), "no VDI signature"),
        ("vhdx", b"vhdxfile", "does not adopt vhdx"),
    ],
)
def test_other_headers_are_refused(fmt: str, head: bytes, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        check_header(fmt, head, what="disk vda")
