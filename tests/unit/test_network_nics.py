"""The pure NIC parts: MACs, tap names, --nic options, the test guest's address, argv."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ferry.core.network import (
    TEST_GUEST_MARK,
    NicOption,
    check_macs,
    generate_mac,
    guest_ip_of,
    host_key,
    nic_devices,
    parse_mac,
    parse_nic_option,
    tap_name,
    tap_prefix,
    vm_taps,
)
from ferry.core.spec import NicSpec, RunContext, VmSpec, qemu_argv
from ferry.errors import InvalidInputError
from ferry.guest.build import APPEND

UUID = "1234abcd-5678-90ef-1234-567890abcdef"


def test_parse_mac_normalises_and_refuses() -> None:
    assert parse_mac("52:54:00:AB:cd:EF") == "52:54:00:ab:cd:ef"
    assert parse_mac("52-54-00-ab-cd-ef") == "52:54:00:ab:cd:ef"
    for bad in ("zz", "52:54:00:ab:cd", "52:54:00:ab:cd:ef:01", "5254.00ab.cdef", ""):
        with pytest.raises(InvalidInputError, match="malformed MAC"):
            parse_mac(bad)
    with pytest.raises(InvalidInputError, match="multicast"):
        parse_mac("01:00:5e:00:00:01")
    with pytest.raises(InvalidInputError, match="all zeros"):
        parse_mac("00:00:00:00:00:00")


def test_generated_macs_are_local_unicast_and_unlike_the_taken() -> None:
    rng = random.Random(7)
    taken: set[str] = set()
    for _ in range(500):
        mac = generate_mac(taken, rng)
        assert parse_mac(mac) == mac
        first = int(mac[:2], 16)
        assert first & 0x02 and not first & 0x01  # locally administered, unicast
        assert mac not in taken
        # The last two bytes differ too: the test guest's address comes from them.
        assert guest_ip_of(mac) not in {guest_ip_of(m) for m in taken}
        assert guest_ip_of(mac) not in ("10.213.0.0", "10.213.0.1", "10.213.255.255")
        taken.add(mac)


def test_tap_names_fit_the_kernel_and_differ_by_host_vm_and_index() -> None:
    key_a, key_b = host_key("/lab/hosts/host-1/data"), host_key("/lab/hosts/host-2/data")
    assert key_a != key_b and len(key_a) == 4
    name = tap_name(key_a, UUID, 0)
    assert len(name) <= 15 and name.startswith(tap_prefix(key_a))
    assert name == f"ft{key_a}1234abcd0"
    assert tap_name(key_b, UUID, 0) != name  # source and destination of a move coexist
    assert vm_taps(key_a, UUID, 3) == [tap_name(key_a, UUID, i) for i in range(3)]
    assert len(set(vm_taps(key_a, UUID, 8))) == 8
    with pytest.raises(InvalidInputError):
        tap_name(key_a, UUID, 99)
    # A refresh's second QEMU takes the other slot: eight NICs each, no name shared.
    both = vm_taps(key_a, UUID, 8, 0) + vm_taps(key_a, UUID, 8, 1)
    assert len(set(both)) == 16 and all(len(n) == 15 for n in both)
    with pytest.raises(InvalidInputError):
        tap_name(key_a, UUID, 0, 2)


def test_guest_ip_of_is_the_macs_last_two_bytes() -> None:
    assert guest_ip_of("02:00:00:00:12:34") == "10.213.18.52"
    assert guest_ip_of("06:0B:04:D6:3E:7C") == "10.213.62.124"
    assert TEST_GUEST_MARK in APPEND.split()


def test_parse_nic_option() -> None:
    assert parse_nic_option("lab") == NicOption("lab")
    assert parse_nic_option("lab,mac=52:54:00:AA:bb:cc,model=e1000") == NicOption(
        "lab", "52:54:00:aa:bb:cc", "e1000"
    )
    assert parse_nic_option("prod,model=virtio") == NicOption("prod", None, "virtio")
    for bad in ("", "mac=52:54:00:aa:bb:cc", "lab,mtu=9000", "lab,mac=", "lab,model=a,model=b"):
        with pytest.raises(InvalidInputError, match="--nic"):
            parse_nic_option(bad)
    with pytest.raises(InvalidInputError, match="malformed MAC"):
        parse_nic_option("lab,mac=12345")


def test_check_macs_refuses_twice_and_taken() -> None:
    check_macs(["02:00:00:00:00:01", None, "02:00:00:00:00:02"], {"02:00:00:00:00:03": "web"})
    with pytest.raises(InvalidInputError, match="two NICs"):
        check_macs(["02:00:00:00:00:01", "02:00:00:00:00:01"], {})
    with pytest.raises(InvalidInputError, match="already used by VM 'web'"):
        check_macs(["02:00:00:00:00:03"], {"02:00:00:00:00:03": "web"})


def test_nic_devices_reads_the_pci_network_section() -> None:
    text = """Controller/Bridge/Hub devices:
name "pci-bridge", bus PCI, desc "Standard PCI Bridge"

Network devices:
name "e1000", bus PCI, alias "e1000-82540em", desc "Intel Gigabit Ethernet"
name "ne2k_isa", bus ISA
name "usb-net", bus usb-bus
name "virtio-net-pci", bus PCI, alias "virtio-net"

Input devices:
name "virtio-keyboard-pci", bus PCI
"""
    assert nic_devices(text) == frozenset({"e1000", "virtio-net-pci"})


def _ctx(tap_host: str | None) -> RunContext:
    run = Path("/run/x")
    return RunContext(qemu_binary="qemu-system-x86_64", accelerator="tcg",
                      pidfile=run / "pid", qmp_socket=run / "qmp",
                      serial_log=run / "serial", tap_host=tap_host)  # fmt: skip


def test_qemu_argv_gives_each_nic_a_tap_and_its_mac() -> None:
    nics = (NicSpec(network="lab", mac="02:00:00:00:12:34"),
            NicSpec(network="prod", mac="02:00:00:00:12:35", model="e1000"))  # fmt: skip
    spec = VmSpec(uuid=UUID, name="web", config_version=3, memory=256 * 1024**2, nics=nics)
    argv = qemu_argv(spec, _ctx("beef"))
    assert "-nic" not in argv
    netdevs = [argv[i + 1] for i, a in enumerate(argv) if a == "-netdev"]
    assert netdevs == [
        "tap,id=net0,ifname=ftbeef1234abcd0,script=no,downscript=no",
        "tap,id=net1,ifname=ftbeef1234abcd1,script=no,downscript=no",
    ]
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert "virtio-net-pci,netdev=net0,mac=02:00:00:00:12:34,id=nic0" in devices
    assert "e1000,netdev=net1,mac=02:00:00:00:12:35,id=nic1" in devices
    with pytest.raises(InvalidInputError, match="no tap names"):
        qemu_argv(spec, _ctx(None))


def test_qemu_argv_without_nics_has_no_network() -> None:
    spec = VmSpec(name="quiet", config_version=3, memory=256 * 1024**2, network=True)
    argv = qemu_argv(spec, _ctx("beef"))
    assert argv[argv.index("-nic") + 1] == "none"
    assert "-netdev" not in argv
