"""Links, bridges, taps and network namespaces through iproute2 (``ip``).

Every call is idempotent: adding what exists or removing what is gone does
nothing, so cleanup after any crash is "remove what matches" (names derive
from a VM's or a lab's identity, :mod:`ferry.core.network`). ``ip`` failures
become :class:`ferry.errors.NetworkError` with what ``ip`` said. Calls are
blocking and quick (one ``ip`` process each); the agent runs them in a thread.

QEMU creates each tap (``-netdev tap,ifname=...``) in the root namespace and
the kernel deletes it when QEMU closes it, so a tap never outlives its QEMU.
A tap of a network whose bridge lies in a namespace is moved there
(``ip link set TAP netns NS``): QEMU's file descriptor keeps working.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import NetworkError

IP = "ip"
MAX_ALIAS = 255  # bytes of a link's IFALIAS
_TIMEOUT_S = 30


def _ip(
    *args: str, netns: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    argv = [IP, *(("-n", netns) if netns else ()), *args]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NetworkError(f"cannot run {' '.join(argv)}: {exc}; install iproute2") from exc
    if check and proc.returncode != 0:
        said = proc.stderr.strip().splitlines()
        raise NetworkError(f"{' '.join(argv)} failed: {said[-1] if said else proc.returncode}")
    return proc


@dataclass(frozen=True)
class Link:
    name: str
    kind: str | None  # "bridge", "tun", "veth", ... (None: a plain device)
    master: str | None
    up: bool
    # A tap made to outlive its opener (ip tuntap add); QEMU's taps are not,
    # so one that is not persistent is held open by a live process.
    persistent: bool = False


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def links(netns: str | None = None) -> list[Link]:
    """Every link of the namespace (the root one if None); none if it does not exist."""
    if netns is not None and not netns_exists(netns):
        return []
    proc = _ip("-j", "-d", "link", "show", netns=netns)
    found = []
    for item in json.loads(proc.stdout or "[]"):
        info = item.get("linkinfo") or {}
        found.append(
            Link(
                name=str(item["ifname"]),
                kind=info.get("info_kind"),
                master=item.get("master"),
                up="UP" in item.get("flags", []),
                persistent=bool((info.get("info_data") or {}).get("persist")),
            )
        )
    return found


def link(name: str, netns: str | None = None) -> Link | None:
    for found in links(netns):
        if found.name == name:
            return found
    return None


def bridge_exists(name: str, netns: str | None = None) -> bool:
    found = link(name, netns)
    return found is not None and found.kind == "bridge"


def attach(tap: str, bridge: str, netns: str | None = None) -> None:
    """Put ``tap`` on ``bridge`` (moving it into ``netns`` first) and bring it up.

    The usual case, a tap its QEMU has just made in the root namespace, takes
    one or two ``ip`` calls (each an ``ip`` process: this runs while a move
    launches its destination); anything else is looked at first.
    """
    if netns is not None and _ip("link", "set", tap, "netns", netns, check=False).returncode == 0:
        _ip("link", "set", tap, "master", bridge, "up", netns=netns)
        return
    if netns is None and _ip("link", "set", tap, "master", bridge, "up",
                             check=False).returncode == 0:  # fmt: skip
        return
    if netns is not None:
        current = link(tap, netns)
        if current is None:
            if link(tap) is None:
                raise NetworkError(f"tap {tap} does not exist (its QEMU is gone)")
            _ip("link", "set", tap, "netns", netns)
            current = link(tap, netns)
        if current is not None and current.master == bridge and current.up:
            return
    else:
        current = link(tap)
        if current is None:
            raise NetworkError(f"tap {tap} does not exist (its QEMU is gone)")
        if current.master == bridge and current.up:
            return
    _ip("link", "set", tap, "master", bridge, "up", netns=netns)


def delete(name: str, netns: str | None = None) -> bool:
    """Remove link ``name`` if it exists; whether it did."""
    if link(name, netns) is None:
        return False
    proc = _ip("link", "delete", name, netns=netns, check=False)
    if proc.returncode != 0 and link(name, netns) is not None:
        raise NetworkError(f"cannot delete {name}: {proc.stderr.strip()}")
    return True


def delete_matching(
    prefix: str, netns: str | None = None, keep: frozenset[str] = frozenset()
) -> list[str]:
    """Remove every link whose name starts with ``prefix``, except ``keep`` and taps
    a live process holds open (a QEMU's: another host's with the same key, or one
    not known here), which the kernel removes when that process ends."""
    gone = []
    for found in links(netns):
        if not found.name.startswith(prefix) or found.name in keep:
            continue
        if found.kind == "tun" and not found.persistent:
            continue
        if delete(found.name, netns):
            gone.append(found.name)
    return gone


def add_netns(name: str) -> None:
    if not netns_exists(name):
        _ip("netns", "add", name)
    _ip("link", "set", "lo", "up", netns=name)


def delete_netns(name: str) -> bool:
    """Remove the namespace (and every link in it); whether it existed."""
    if not netns_exists(name):
        return False
    _ip("netns", "delete", name)
    return True


def add_bridge(name: str, netns: str | None = None, address: str | None = None) -> None:
    """A bridge ``name`` that is up, with ``address`` (``A.B.C.D/N``) if given."""
    if link(name, netns) is None:
        _ip("link", "add", name, "type", "bridge", netns=netns)
    _ip("link", "set", name, "up", netns=netns)
    if address is not None:
        shown = _ip("-j", "addr", "show", "dev", name, netns=netns).stdout
        have = {
            f"{a['local']}/{a['prefixlen']}"
            for item in json.loads(shown or "[]")
            for a in item.get("addr_info", [])
        }
        if address not in have:
            _ip("addr", "add", address, "dev", name, netns=netns)


def set_alias(name: str, alias: str, netns: str | None = None) -> None:
    """Label link ``name`` (its IFALIAS, up to MAX_ALIAS bytes) so a sweep knows its owner."""
    _ip("link", "set", name, "alias", alias, netns=netns)


def alias_of(name: str, netns: str | None = None) -> str | None:
    if netns is not None and not netns_exists(netns):
        return None
    proc = _ip("-j", "link", "show", "dev", name, netns=netns, check=False)
    if proc.returncode != 0:
        return None
    items = json.loads(proc.stdout or "[]")
    alias = items[0].get("ifalias") if items else None
    return str(alias) if alias else None


def namespaces(prefix: str) -> list[str]:
    """The named network namespaces whose names start with ``prefix``."""
    try:
        return sorted(p.name for p in Path("/run/netns").iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def exec_argv(netns: str, argv: list[str]) -> list[str]:
    """The command line that runs ``argv`` inside ``netns``."""
    return [IP, "netns", "exec", netns, *argv]


class IpLinks:
    """This machine's links through ``ip``, as :class:`ferry.host.networks.Links`
    asks for them (``ferry.testing.netdev.FakeLinks`` is the unit tests' one)."""

    netns_exists = staticmethod(netns_exists)
    bridge_exists = staticmethod(bridge_exists)
    links = staticmethod(links)
    link = staticmethod(link)
    attach = staticmethod(attach)
    delete = staticmethod(delete)
    delete_matching = staticmethod(delete_matching)
