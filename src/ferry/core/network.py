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
from collections.abc import Iterable, Mapping
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
NETWORK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MAX_NICS = 8
DEFAULT_MODEL = "virtio"
# A NIC model: a QEMU device name, so never ',' '=' or spaces (it goes into -device).
NIC_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
# The QEMU device of each NIC model ferry names itself; any other model is a
# QEMU NIC device name (e1000, rtl8139, ...), checked against the host's QEMU.
_MODEL_DEVICES = {"virtio": "virtio-net-pci"}

# Tap names: "ft" + 4 hex of the host's key + 8 hex of the VM's uuid + one
# index character = 15, the kernel's limit. The host key is in the name
# because the lab's hosts share one kernel: during a move between them the
# source's and the destination's taps of one VM exist at the same time.
TAP_PREFIX = "ft"
_INDEX_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"
# Two sets of tap names per VM and host ("slots"): a refresh to a fresh QEMU
# on the same host (host refresh-vms) starts the new QEMU in the other slot
# while the old one still holds its taps. Slot s uses index characters
# s * TAP_SLOT_SIZE ... (so at most TAP_SLOT_SIZE NICs).
TAP_SLOTS = 2
TAP_SLOT_SIZE = len(_INDEX_CHARS) // TAP_SLOTS

# The test guest takes an address in this /16 derived from its MAC (the
# MAC's last two bytes), so nothing has to hand addresses out; the lab's
# bridge has LAB_BRIDGE_IP, the address `ferry lab exec` peers talk from.
TEST_GUEST_NET = "10.213"
TEST_GUEST_PREFIX = 16
LAB_BRIDGE_IP = f"{TEST_GUEST_NET}.0.1"
# On the test guest's kernel command line: vm show gives its NICs their address.
TEST_GUEST_MARK = "ferry.guest=test"
# Last-two-byte values a generated MAC avoids: the network, the lab's bridge, broadcast.
_RESERVED_LOW = frozenset({0x0000, 0x0001, 0xFFFF})


class HostNetwork(BaseModel):
    """A host network: ``name`` -> bridge ``bridge`` (inside namespace ``netns`` if set)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    bridge: str
    netns: str | None = None


def check_ifname(name: str, *, what: str = "bridge name") -> str:
    if not IFNAME_RE.fullmatch(name):
        raise InvalidInputError(
            f"invalid {what} {name!r}: use 1-15 letters, digits, '.', '_' or '-'"
        )
    return name


def check_netns(name: str) -> str:
    if not NETNS_RE.fullmatch(name):
        raise InvalidInputError(
            f"invalid network namespace {name!r}: use 1-64 letters, digits, '.', '_' or '-'"
        )
    return name


def parse_mac(text: str) -> str:
    """A MAC a NIC can use, as ``aa:bb:cc:dd:ee:ff`` (``-`` separators accepted)."""
    mac = text.strip().lower().replace("-", ":")
    if not MAC_RE.fullmatch(mac):
        raise InvalidInputError(
            f"malformed MAC {text!r}: use six hex bytes, e.g. 52:54:00:12:34:56"
        )
    first = int(mac[:2], 16)
    if first & 0x01:
        raise InvalidInputError(f"MAC {text!r} is a multicast address: a NIC needs a unicast MAC")
    if mac == "00:00:00:00:00:00":
        raise InvalidInputError(f"MAC {text!r} is all zeros: a NIC needs a real MAC")
    return mac


def nic_mac_value(mac: str) -> str:
    """A stored NIC's MAC as a pydantic validator: canonical, unicast, not all zeros."""
    try:
        canonical = parse_mac(mac)
    except InvalidInputError as exc:
        raise ValueError(str(exc)) from None
    if canonical != mac:
        raise ValueError(f"MAC {mac!r} is not in the form aa:bb:cc:dd:ee:ff (lower case)")
    return mac


def check_nic_model(model: str) -> str:
    """A NIC model as typed or read from a file: one clear line if it cannot be one."""
    try:
        return nic_model_value(model)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None


def nic_model_value(model: str) -> str:
    """A stored NIC's model as a pydantic validator (it ends up in QEMU's -device)."""
    if not NIC_MODEL_RE.fullmatch(model):
        raise ValueError(
            f"invalid NIC model {model!r}: use a QEMU NIC device name "
            "(letters, digits, '.', '_' or '-'), e.g. virtio or e1000"
        )
    return model


def network_name_value(name: str) -> str:
    """A NIC's network name as a pydantic validator."""
    if not NETWORK_NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid network name {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _low16(mac: str) -> int:
    return int(mac[12:14] + mac[15:17], 16)


def generate_mac(taken: Iterable[str], rng: random.Random | None = None) -> str:
    """A new locally administered unicast MAC, unlike every MAC in ``taken``.

    It also differs from each of them in its last two bytes, which the test
    guest turns into its address (:func:`guest_ip_of`).
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


def nic_devices(device_help: str) -> frozenset[str]:
    """The PCI NIC devices in the output of ``qemu-system-x86_64 -device help``."""
    names = set()
    section = False
    for line in device_help.splitlines():
        if line.endswith(":") and not line.startswith("name "):
            section = line == "Network devices:"
        elif section and line.startswith('name "') and "bus PCI" in line:
            names.add(line.split('"')[1])
    return frozenset(names)


def host_key(identity: str) -> str:
    """A host's 4-hex key in tap names, from something unique to it (its data dir)."""
    return hashlib.sha256(identity.encode()).hexdigest()[:4]


def tap_prefix(key: str) -> str:
    """Every tap of the host with ``key`` starts so (cleanup removes what matches)."""
    return f"{TAP_PREFIX}{key}"


def tap_name(key: str, uuid: str, index: int, slot: int = 0) -> str:
    """The tap of NIC ``index`` of VM ``uuid`` on the host with ``key``, in ``slot``."""
    if not 0 <= index < TAP_SLOT_SIZE or not 0 <= slot < TAP_SLOTS:
        raise InvalidInputError(f"NIC index {index} (slot {slot}) is out of range")
    char = _INDEX_CHARS[slot * TAP_SLOT_SIZE + index]
    name = f"{tap_prefix(key)}{uuid.replace('-', '')[:8]}{char}"
    assert len(name) <= 15, name
    return name


def vm_taps(key: str, uuid: str, count: int, slot: int = 0) -> list[str]:
    return [tap_name(key, uuid, i, slot) for i in range(count)]


def guest_ip_of(mac: str) -> str:
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
            model = check_nic_model(value)
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


# -- network maps and pre-flight checks (moves, imports, replicas) -------------------
# A VM's NICs name networks; another host may call the same LAN something
# else. A network map (``--network-map SRC=DST``, repeatable) says which of
# the other host's networks stands for each of the VM's; the MACs stay, so
# the guest sees the same NICs.


def parse_network_map(items: Iterable[str]) -> dict[str, str]:
    """``SRC=DST`` items (the repeatable ``--network-map``) as ``{SRC: DST}``.

    SRC is a network the VM uses, DST a network of the other host. Naming
    one SRC twice with different DSTs is refused; the same pair twice is
    the same map.
    """
    found: dict[str, str] = {}
    for item in items:
        src, eq, dst = item.strip().partition("=")
        src, dst = src.strip(), dst.strip()
        if not eq or not src or not dst:
            raise InvalidInputError(
                f"--network-map {item!r}: write SRC=DST (a network the VM uses, then the "
                "network of the other host that stands for it), e.g. prod=lab"
            )
        for name in (src, dst):
            if not NETWORK_NAME_RE.fullmatch(name):
                raise InvalidInputError(
                    f"--network-map {item!r}: {name!r} is not a network name (1-63 letters, "
                    "digits, '.', '_' or '-', starting with a letter or digit)"
                )
        if found.get(src, dst) != dst:
            raise InvalidInputError(
                f"--network-map maps network {src!r} twice ({found[src]!r} and {dst!r}); "
                "give each network one destination"
            )
        found[src] = dst
    return found


def check_network_map(network_map: Mapping[str, str]) -> dict[str, str]:
    """A map that came as JSON (the API), checked as :func:`parse_network_map` checks flags."""
    return parse_network_map(f"{src}={dst}" for src, dst in network_map.items())


def vm_networks(spec: VmSpec) -> list[str]:
    """The networks the VM's NICs are on, each once, in NIC order."""
    return list(dict.fromkeys(nic.network for nic in spec.nics))


def missing_networks(
    spec: VmSpec, host_networks: Iterable[str], network_map: Mapping[str, str]
) -> list[str]:
    """The networks (as the other host names them) that VM ``spec`` needs and it lacks.

    Each of the VM's networks is looked up under its mapped name (itself
    when the map does not name it); the answer keeps NIC order.
    """
    have = set(host_networks)
    wanted = (network_map.get(name, name) for name in vm_networks(spec))
    return [name for name in dict.fromkeys(wanted) if name not in have]


def network_refusal(
    spec: VmSpec,
    *,
    host: str,
    host_networks: Iterable[str],
    network_map: Mapping[str, str],
) -> str | None:
    """Why VM ``spec`` cannot go to ``host`` for its networks (one line), or None.

    Refused: a map entry for a network the VM does not use (a typo would
    otherwise be silently ignored), and a network the host lacks, named as
    the host would know it, with the map entry that named it.
    """
    used = vm_networks(spec)
    unused = [src for src in network_map if src not in used]
    if unused:
        uses = ", ".join(used) if used else "no network"
        return (
            f"--network-map names network {unused[0]!r}, which VM {spec.name!r} does not "
            f"use (it uses {uses})"
        )
    missing = missing_networks(spec, host_networks, network_map)
    if not missing:
        return None
    name = missing[0]
    sources = [src for src, dst in network_map.items() if dst == name]
    if sources:
        return (
            f"host {host!r} has no network {name!r} (--network-map {sources[0]}={name}); add "
            f"it there ('ferry host network add {name} --bridge BR --host {host}') or map to "
            "a network it has"
        )
    return (
        f"host {host!r} has no network {name!r}, which VM {spec.name!r} uses; add it there "
        f"('ferry host network add {name} --bridge BR --host {host}') or map it with "
        f"--network-map {name}=NETWORK"
    )


def check_networks(
    spec: VmSpec,
    *,
    host: str,
    host_networks: Iterable[str],
    network_map: Mapping[str, str],
) -> None:
    """Raise the one-line refusal of :func:`network_refusal`, if there is one."""
    refusal = network_refusal(spec, host=host, host_networks=host_networks,
                              network_map=network_map)  # fmt: skip
    if refusal is not None:
        raise InvalidInputError(refusal)


def apply_network_map(spec: VmSpec, network_map: Mapping[str, str]) -> VmSpec:
    """``spec`` with each NIC on its mapped network; MACs and models stay."""
    if not network_map or not spec.nics:
        return spec
    nics = tuple(nic.model_copy(update={"network": network_map.get(nic.network, nic.network)})
                 for nic in spec.nics)  # fmt: skip
    return spec.model_copy(update={"nics": nics})


def reverse_network_map(network_map: Mapping[str, str]) -> dict[str, str]:
    """The map back (``DST=SRC``), for replication reversed after a failover.

    Where two networks were mapped onto one, the first of them is the way back.
    """
    back: dict[str, str] = {}
    for src, dst in network_map.items():
        back.setdefault(dst, src)
    return back
