"""Links in memory, for unit tests of :class:`ferry.host.networks.HostNetworks`.

:class:`FakeLinks` keeps namespaces, bridges and taps the way ``ip`` does:
a tap appears in the root namespace (as QEMU makes it), ``attach`` moves it
into the bridge's namespace and puts it on the bridge, deleting a namespace
deletes what is in it. Every change lands in :attr:`FakeLinks.calls`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ferry.adapters.netdev import Link
from ferry.errors import NetworkError

Space = str | None  # a namespace's name; None: the root namespace


@dataclass
class FakeLinks:
    spaces: dict[Space, dict[str, Link]] = field(default_factory=lambda: {None: {}})
    calls: list[tuple[str, str, Space]] = field(default_factory=list)

    # -- set-up, as the test wants the machine ---------------------------------

    def add_netns(self, name: str) -> None:
        self.spaces.setdefault(name, {})

    def add_bridge(self, name: str, netns: Space = None) -> None:
        self.spaces[netns][name] = Link(name=name, kind="bridge", master=None, up=True)

    def add_tap(self, name: str, netns: Space = None, *, persistent: bool = False) -> None:
        """A tap as QEMU makes it (held open, in the root namespace, on no bridge, down),
        or ``persistent`` as ``ip tuntap add`` makes one that nothing holds."""
        self.spaces[netns][name] = Link(name=name, kind="tun", master=None, up=False,
                                        persistent=persistent)  # fmt: skip

    def names(self, netns: Space = None) -> list[str]:
        return sorted(self.spaces.get(netns, {}))

    # -- what HostNetworks calls -----------------------------------------------

    def netns_exists(self, name: str) -> bool:
        return name in self.spaces

    def bridge_exists(self, name: str, netns: Space = None) -> bool:
        found = self.link(name, netns)
        return found is not None and found.kind == "bridge"

    def links(self, netns: Space = None) -> list[Link]:
        return [link for _, link in sorted(self.spaces.get(netns, {}).items())]

    def link(self, name: str, netns: Space = None) -> Link | None:
        return self.spaces.get(netns, {}).get(name)

    def attach(self, tap: str, bridge: str, netns: Space = None) -> None:
        if not self.bridge_exists(bridge, netns):
            raise NetworkError(f"no bridge {bridge} in {netns or 'the root namespace'}")
        if tap not in self.spaces[netns]:
            if tap not in self.spaces[None]:
                raise NetworkError(f"tap {tap} does not exist (its QEMU is gone)")
            self.spaces[netns][tap] = self.spaces[None].pop(tap)
            self.calls.append(("move", tap, netns))
        self.spaces[netns][tap] = replace(self.spaces[netns][tap], master=bridge, up=True)
        self.calls.append(("attach", tap, netns))

    def delete(self, name: str, netns: Space = None) -> bool:
        if self.spaces.get(netns, {}).pop(name, None) is None:
            return False
        self.calls.append(("delete", name, netns))
        return True

    def delete_matching(
        self, prefix: str, netns: Space = None, keep: frozenset[str] = frozenset()
    ) -> list[str]:
        gone = [n for n, link in sorted(self.spaces.get(netns, {}).items())
                if n.startswith(prefix) and n not in keep
                and (link.kind != "tun" or link.persistent)]  # fmt: skip
        for name in gone:
            self.delete(name, netns)
        return gone
