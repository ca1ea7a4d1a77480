"""The libvirt domain parser: what a virsh dumpxml becomes, and what it refuses."""

from __future__ import annotations

import pytest

from ferry.core.adopt.libvirt import parse_domain
from ferry.errors import InvalidInputError
from tests.unit.adopt_samples import BILLION_LAUGHS, DOMAIN, EXTERNAL_ENTITY

ROOT = "/srv/images/web01.qcow2"
DATA = "/srv/images/web01-data.img"


def domain(**changes: str) -> bytes:
    text = DOMAIN.format(root=ROOT, data=DATA)
    for old, new in changes.items():
        assert old in text, old
        text = text.replace(old, new)
    return text.encode()


def test_a_dumped_domain_becomes_a_plan() -> None:
    plan = parse_domain(domain())
    assert plan.origin == "libvirt"
    assert plan.name == "web01"
    assert plan.uuid == "7d8f2e3a-5b41-4c9e-9f0a-2b6d1c3e4f50"
    assert plan.memory == 2 * 1024**3
    assert plan.cpus == 2
    assert plan.cpu_model == "Skylake-Client-IBRS"
    assert plan.firmware == "uefi"
    assert [(d.source, d.format, d.target) for d in plan.disks] == [
        (ROOT, "qcow2", "vda"),
        (DATA, "raw", "sda"),
    ]
    assert [(n.network, n.mac, n.model) for n in plan.nics] == [
        ("default", "52:54:00:6b:3c:58", "virtio"),
        ("br-storage", "52:54:00:aa:10:02", "e1000e"),
    ]
    assert plan.display == "vnc"
    assert plan.guest_agent
    assert plan.kernel is None


def test_what_is_not_carried_over_is_said() -> None:
    notes = "\n".join(parse_domain(domain()).not_carried)
    for expected in (
        "cdrom sdb (/var/lib/libvirt/images/debian-12.iso)",
        "balloon's current memory (1024M)",
        "UEFI variables",
        "md-clear",
        "bus sata becomes a virtio disk",
        "SPICE display becomes a VNC display",
        "sound",
        "redirdev",
        "rng",
        "host tuning (resource)",
    ):
        assert expected in notes, expected
    assert "controller" not in notes.split("devices are not carried over:")[1]


def test_a_domain_with_entities_is_refused_before_expansion() -> None:
    for document in (BILLION_LAUGHS, EXTERNAL_ENTITY):
        with pytest.raises(InvalidInputError, match="DTD or entities"):
            parse_domain(document)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"<domain type='kvm' id='3'>": "<domain type='xen'>"}, "xen domain"),
        ({"arch='x86_64'": "arch='aarch64'"}, "aarch64 machine"),
        (
            {
                "'file' device='disk'>\n      <driver name='qemu' type='qcow2'": (
                    "'block' device='disk'>\n      <driver name='qemu' type='qcow2'"
                )
            },
            "block disk",
        ),
        ({"type='qcow2' discard='unmap'": "type='qed'"}, "is qed"),
        (
            {
                "<backingStore/>\n      <target dev='vda'": (
                    "<backingStore type='file'><format type='qcow2'/>"
                    "<source file='/srv/images/base.qcow2'/></backingStore><target dev='vda'"
                )
            },
            "backing chain",
        ),
        ({"52:54:00:AA:10:02": "52:54:00:6B:3C:58"}, "two NICs"),
        ({"52:54:00:AA:10:02": "52:54:00:zz:10:02"}, "malformed MAC"),
        ({"52:54:00:AA:10:02": "01:54:00:aa:10:02"}, "multicast"),
        (
            {"<memory unit='KiB'>2097152</memory>": "<memory unit='parsec'>2</memory>"},
            "unknown unit",
        ),
        (
            {"<uuid>7d8f2e3a-5b41-4c9e-9f0a-2b6d1c3e4f50</uuid>": "<uuid>not-a-uuid</uuid>"},
            "malformed",
        ),
    ],
)
def test_unsupported_domains_are_refused_in_one_line(change: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as caught:
        parse_domain(domain(**change))
    assert "\n" not in str(caught.value)


def test_broken_xml_and_other_roots_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="not well-formed"):
        parse_domain(b"<domain type='kvm'><name>x</name>")
    with pytest.raises(InvalidInputError, match="not a libvirt domain"):
        parse_domain(b"<network><name>default</name></network>")


def test_host_passthrough_and_bios_and_direct_kernel_boot() -> None:
    text = domain(**{
        "<os firmware='efi'>": "<os>",
        "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>":
            "<kernel>/srv/images/vmlinuz</kernel><initrd>/srv/images/initrd.img</initrd>"
            "<cmdline>console=ttyS0 root=/dev/vda1</cmdline>",
        "<cpu mode='custom' match='exact' check='partial'>":
            "<cpu mode='host-passthrough' check='none'>",
        "<clock offset='utc'>": "<clock offset='localtime'>",
        "pc-q35-7.2": "pc-i440fx-7.2",
    })  # fmt: skip
    plan = parse_domain(text)
    assert plan.firmware == "bios"
    assert plan.cpu_model is None
    assert (plan.kernel, plan.initrd) == ("/srv/images/vmlinuz", "/srv/images/initrd.img")
    assert plan.append == "console=ttyS0 root=/dev/vda1"
    notes = "\n".join(plan.not_carried)
    assert "CPU mode host-passthrough" in notes
    assert "clock offset (localtime)" in notes
    assert "pc-i440fx-7.2" in notes


def test_boot_order_picks_the_boot_disk_and_names_are_made_valid() -> None:
    text = domain(**{
        "<target dev='sda' bus='sata'/>": "<target dev='sda' bus='sata'/><boot order='1'/>",
        "<name>web01</name>": "<name>web 01 (old)</name>",
    })  # fmt: skip
    plan = parse_domain(text)
    assert plan.boot_disk == 1
    assert plan.name == "web-01-old"
    assert any("'web 01 (old)'" in note for note in plan.not_carried)


def test_a_nic_that_is_not_on_a_host_network_is_noted_not_carried() -> None:
    text = domain(**{
        "<interface type='bridge'>": "<interface type='user'>",
        "<source bridge='br-storage'/>": "",
    })  # fmt: skip
    plan = parse_domain(text)
    assert [n.network for n in plan.nics] == ["default"]
    assert any("user NIC 52:54:00:aa:10:02 is not carried over" in n for n in plan.not_carried)
