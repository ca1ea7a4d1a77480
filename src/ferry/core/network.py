"""Networks and NICs as data: MACs, tap names, NIC options, the test guest's address.

Pure: no I/O. A host network is a name for a Linux bridge on that host
(optionally a bridge inside a network namespace, as the lab's); a VM's NIC
names a network, never a bridge, so hosts can differ. The side effects (taps,
bridges, namespaces) are in :mod:`ferry.adapters.netdev`, the host's list of
networks in :mod:`ferry.host.networks`.

Import note: :mod:`ferry.core.spec` imports this module (qemu_argv needs
:func:`tap_name` and :func:`nic_device`), so this module imports ``spec``
only under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from ferry.errors import InvalidInputError

if TYPE_CHECKING:
    from ferry.core.spec import VmSpec

# Linux interface names: at most 15 bytes (IFNAMSIZ - 1), no '/', ':' or spaces.
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
NETNS_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
MAX_NICS = 8
DEFAULT_MODEL = "virtio"
# The QEMU device of each NIC model ferry names itself; any other model is a
# QEMU NIC device name (e1000, rtl8139, ...), checked against the host's QEMU.
_MODEL_DEVICES = {"virtio": "virtio-net-pci"}

# Tap names: "ft" + 4 hex of the host's key + 8 hex of the VM's uuid + one
# index character = 15, the kernel's limit. The host key is in the name
# because the lab's hosts share one kernel: during a move between them the
# source's and the destination's taps of one VM exist at the same time.
TAP_PREFIX = "ft"
_INDEX_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"

# The test guest takes an address in this /16 derived from its MAC (the
# MAC's last two bytes), so nothing has to hand addresses out; the lab's
# bridge has LAB_BRIDGE_IP, the address `ferry lab exec` peers talk from.
TEST_GUEST_NET = "10.213"
TEST_GUEST_PREFIX = 16
LAB_BRIDGE_IP = f"{TEST_GUEST_NET}.0.1"
# Last-two-byte values a generated MAC avoids: the network, the lab's bridge, broadcast.
_RESERVED_LOW = frozenset({0x0000, 0x0001, 0xFFFF})


class HostNetwork(BaseModel):
    """A host network: ``name`` -> bridge ``bridge`` (inside namespace ``netns`` if set)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    bridge: str
    netns: str | None = None


def check_ifname(name: str, *, what: str = "bridge name") -> str:
    if not IFNAME_RE.match(name):
        raise InvalidInputError(
            f"invalid {what} {name!r}: use 1-15 letters, digits, '.', '_' or '-'"
        )
    return name


def check_netns(name: str) -> str:
    if not NETNS_RE.match(name):
        raise InvalidInputError(
            f"invalid network namespace {name!r}: use 1-64 letters, digits, '.', '_' or '-'"
        )
    return name


def parse_mac(text: str) -> str:
    """A MAC a NIC can use, as ``aa:bb:cc:dd:ee:ff`` (``-`` separators accepted)."""
    mac = text.strip().lower().replace("-", ":")
    if not MAC_RE.match(mac):
        raise InvalidInputError(
            f"malformed MAC {text!r}: use six hex bytes, e.g. 52:54:00:12:34:56"
        )
    first = int(mac[:2], 16)
    if first & 0x01:
        raise InvalidInputError(f"MAC {text!r} is a multicast address: a NIC needs a unicast MAC")
    if mac == "00:00:00:00:00:00":
        raise InvalidInputError(f"MAC {text!r} is all zeros: a NIC needs a real MAC")
    return mac


def _low16(mac: str) -> int:
    return int(mac[12:14] + mac[15:17], 16)


def generate_mac(taken: Iterable[str], rng: random.Random | None = None) -> str:
    """A new locally administered unicast MAC, unlike every MAC in ``taken``.

    It also differs from each of them in its last two bytes, which the test
    guest turns into its address (:func:`test_guest_ip`).
    """
    pick = rng or random.SystemRandom()
    used = set(taken)
    used_low = {_low16(m) for m in used}
    for _ in range(10_000):
        octets = [pick.randrange(256) for _ in range(6)]
        octets[0] = (octets[0] & 0xFC) | 0x02  # locally administered, unicast
        mac = ":".join(f"{o:02x}" for o in octets)
        low = _low16(mac)
        if mac not in used and low not in used_low and low not in _RESERVED_LOW:
            return mac
    raise InvalidInputError("cannot find a free MAC: too many NICs on this host")


def nic_device(model: str) -> str:
    """The QEMU device of NIC ``model``."""
    return _MODEL_DEVICES.get(model, model)


def host_key(identity: str) -> str:
    """A host's 4-hex key in tap names, from something unique to it (its data dir)."""
    return hashlib.sha256(identity.encode()).hexdigest()[:4]


def tap_prefix(key: str) -> str:
    """Every tap of the host with ``key`` starts so (cleanup removes what matches)."""
    return f"{TAP_PREFIX}{key}"


def tap_name(key: str, uuid: str, index: int) -> str:
    """The tap of NIC ``index`` of VM ``uuid`` on the host with ``key``."""
    if not 0 <= index < len(_INDEX_CHARS):
        raise InvalidInputError(f"NIC index {index} is out of range")
    name = f"{tap_prefix(key)}{uuid.replace('-', '')[:8]}{_INDEX_CHARS[index]}"
    assert len(name) <= 15, name
    return name


def vm_taps(key: str, uuid: str, count: int) -> list[str]:
    return [tap_name(key, uuid, i) for i in range(count)]


def test_guest_ip(mac: str) -> str:
    """The address the test guest takes on the NIC with ``mac`` (init.sh does the same)."""
    low = _low16(parse_mac(mac))
    return f"{TEST_GUEST_NET}.{low >> 8}.{low & 0xFF}"


@dataclass(frozen=True)
class NicOption:
    """One ``--nic NETWORK[,mac=MAC][,model=MODEL]`` as typed (MAC checked, not yet chosen)."""

    network: str
    mac: str | None = None
    model: str = DEFAULT_MODEL


def parse_nic_option(text: str) -> NicOption:
    """Parse ``--nic NETWORK[,mac=MAC][,model=MODEL]``."""
    network, *options = [part.strip() for part in text.split(",")]
    if not network or "=" in network:
        raise InvalidInputError(
            f"--nic {text!r}: start with the network's name, e.g. --nic lab,mac=52:54:00:12:34:56"
        )
    mac: str | None = None
    model = DEFAULT_MODEL
    seen: set[str] = set()
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in ("mac", "model") or key in seen or not value:
            raise InvalidInputError(
                f"--nic {text!r}: options are mac=MAC and model=MODEL, each once"
            )
        seen.add(key)
        if key == "mac":
            mac = parse_mac(value)
        else:
            model = value
    return NicOption(network=network, mac=mac, model=model)


def check_macs(wanted: Iterable[str | None], others: dict[str, str]) -> None:
    """Refuse a MAC given twice, or one that ``others`` (MAC -> VM name) already uses."""
    seen: set[str] = set()
    for mac in wanted:
        if mac is None:
            continue
        if mac in seen:
            raise InvalidInputError(f"MAC {mac} is given to two NICs: each NIC needs its own")
        seen.add(mac)
        if mac in others:
            raise InvalidInputError(
                f"MAC {mac} is already used by VM {others[mac]!r} on this host: pick another "
                "or leave mac= out to get a new one"
            )


# -- network maps and pre-flight checks (owner: the network-moves engineer) ----
# (Re-written here by the networks engineer after overwriting an uncommitted
# first version by accident; the network-moves engineer owns this part.)


def parse_network_map(items: Iterable[str]) -> dict[str, str]:
    """``["prod=lab", ...]`` (``--network-map SRC=DST``, repeatable) -> ``{"prod": "lab"}``."""
    mapping: dict[str, str] = {}
    for item in items:
        src, sep, dst = (part.strip() for part in item.partition("="))
        if not sep or not src or not dst:
            raise InvalidInputError(f"--network-map {item!r}: use SRC=DST, e.g. prod=lab")
        if src in mapping:
            raise InvalidInputError(f"--network-map names network {src!r} twice")
        mapping[src] = dst
    return mapping


def missing_networks(
    spec: VmSpec, host_networks: Iterable[str], network_map: dict[str, str]
) -> list[str]:
    """The networks (after ``network_map``) that ``spec``'s NICs need and the host lacks."""
    have = set(host_networks)
    missing: list[str] = []
    for nic in spec.nics:
        name = network_map.get(nic.network, nic.network)
        if name not in have and name not in missing:
            missing.append(name)
    return missing
