"""This host's networks (names for bridges) and the taps of its VMs' NICs.

A network comes from ``host.toml`` (``[networks.NAME] bridge = "br0"``, kept
there) or from ``ferry host network add`` (kept in the catalog's settings).
A VM's NIC names a network; its tap is named from this host's key and the
VM's uuid (:func:`ferry.core.network.tap_name`), made by QEMU, and attached
here to the network's bridge right after QEMU started (moved into the
bridge's namespace first when the network has one). The kernel removes a
tap with its QEMU; :meth:`HostNetworks.cleanup` removes any other tap of
this host's prefix that no running QEMU owns (agent start).
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from collections.abc import Iterable, Mapping
from typing import Protocol

from ferry.adapters import netdev
from ferry.adapters.catalog import Catalog
from ferry.core.network import (
    MAX_NICS,
    TAP_SLOTS,
    HostNetwork,
    NicOption,
    check_ifname,
    check_macs,
    check_netns,
    generate_mac,
    host_key,
    nic_device,
    nic_devices,
    tap_prefix,
    vm_taps,
)
from ferry.core.spec import NicSpec, VmSpec, check_name
from ferry.errors import ConflictError, InvalidInputError, NetworkError, NotFoundError
from ferry.host.config import HostConfig

log = logging.getLogger(__name__)

SETTING = "networks"


class Links(Protocol):
    """The link operations the host's networks need (:class:`netdev.IpLinks` for real)."""

    def netns_exists(self, name: str) -> bool: ...
    def bridge_exists(self, name: str, netns: str | None = None) -> bool: ...
    def links(self, netns: str | None = None) -> list[netdev.Link]: ...
    def link(self, name: str, netns: str | None = None) -> netdev.Link | None: ...
    def attach(self, tap: str, bridge: str, netns: str | None = None) -> None: ...
    def delete(self, name: str, netns: str | None = None) -> bool: ...
    def delete_matching(
        self, prefix: str, netns: str | None = None, keep: frozenset[str] = frozenset()
    ) -> list[str]: ...


class HostNetworks:
    """The networks of one host, and the taps of its VMs."""

    def __init__(
        self,
        config: HostConfig,
        catalog: Catalog,
        *,
        links: Links | None = None,
        nic_models: frozenset[str] | None = None,
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.key = host_key(str(config.data_dir.resolve()))
        self.links: Links = links or netdev.IpLinks()
        # The PCI NIC devices of the host's QEMU (None: asked once, when first needed).
        self._nic_models = nic_models

    # -- the list ------------------------------------------------------------

    def _added(self) -> dict[str, HostNetwork]:
        raw = self.catalog.setting(SETTING)
        docs = json.loads(raw) if raw else {}
        return {name: HostNetwork.model_validate(doc) for name, doc in docs.items()}

    def _save(self, added: Mapping[str, HostNetwork]) -> None:
        docs = {name: net.model_dump() for name, net in sorted(added.items())}
        self.catalog.put_setting(SETTING, json.dumps(docs))

    def all(self) -> dict[str, HostNetwork]:
        """Every network of this host by name (host.toml's first)."""
        nets = {name: HostNetwork(name=name, **cfg.model_dump())
                for name, cfg in self.config.networks.items()}  # fmt: skip
        for name, net in self._added().items():
            nets.setdefault(name, net)
        return nets

    def get(self, name: str) -> HostNetwork:
        nets = self.all()
        if name not in nets:
            known = ", ".join(sorted(nets)) or "none"
            raise NotFoundError(
                f"no network named {name!r} on host {self.config.name!r} (known: {known}); "
                f"add one with: ferry host network add {name} --bridge BR --host {self.config.name}"
            )
        return nets[name]

    async def views(self) -> list[dict[str, object]]:
        """``[{name, bridge, netns, exists, source}]`` for host show / network list."""
        rows: list[dict[str, object]] = []
        for name, net in sorted(self.all().items()):
            exists = await asyncio.to_thread(self.links.bridge_exists, net.bridge, net.netns)
            rows.append({"name": name, "bridge": net.bridge, "netns": net.netns,
                         "exists": exists,
                         "source": "host.toml" if name in self.config.networks
                         else "added"})  # fmt: skip
        return rows

    async def add(self, name: str, bridge: str, netns: str | None = None) -> HostNetwork:
        check_name(name, what="network name")
        check_ifname(bridge)
        if netns is not None:
            check_netns(netns)
        existing = self.all().get(name)
        wanted = HostNetwork(name=name, bridge=bridge, netns=netns)
        if existing is not None:
            if existing == wanted:
                return existing
            raise ConflictError(
                f"host {self.config.name!r} already has network {name!r} (bridge "
                f"{existing.bridge}); remove it first: ferry host network remove {name} "
                f"--host {self.config.name}"
            )
        if netns is not None and not await asyncio.to_thread(self.links.netns_exists, netns):
            raise NotFoundError(
                f"network namespace {netns!r} does not exist on host {self.config.name!r}"
            )
        if not await asyncio.to_thread(self.links.bridge_exists, bridge, netns):
            where = f" in namespace {netns}" if netns else ""
            if await asyncio.to_thread(self.links.link, bridge, netns) is not None:
                raise InvalidInputError(
                    f"{bridge!r}{where} on host {self.config.name!r} is not a bridge: "
                    "name a Linux bridge (ip link add NAME type bridge)"
                )
            raise NotFoundError(
                f"bridge {bridge!r} does not exist{where} on host {self.config.name!r}: "
                f"create it first (ip link add {bridge} type bridge)"
            )
        added = self._added()
        added[name] = wanted
        self._save(added)
        log.info("network %s -> bridge %s%s", name, bridge, f" in {netns}" if netns else "")
        return wanted

    def remove(self, name: str) -> None:
        self.get(name)
        if name in self.config.networks:
            raise ConflictError(
                f"network {name!r} is set in host.toml of host {self.config.name!r}; "
                "remove it there and restart the agent"
            )
        users = [r.name for r in self.catalog.vms() if any(n.network == name for n in r.spec.nics)]
        if users:
            raise ConflictError(
                f"network {name!r} on host {self.config.name!r} is used by VM(s) "
                f"{', '.join(users)}: delete them or move them away first"
            )
        added = self._added()
        del added[name]
        self._save(added)

    # -- NICs of a new VM ------------------------------------------------------

    def macs_in_use(self, *, except_uuid: str | None = None) -> dict[str, str]:
        """MAC -> VM name of every NIC of this host's VMs."""
        return {nic.mac: record.name for record in self.catalog.vms()
                if record.uuid != except_uuid for nic in record.spec.nics}  # fmt: skip

    async def nic_models(self) -> frozenset[str]:
        """The PCI NIC devices this host's QEMU has (``-device help``), asked once."""
        if self._nic_models is None:
            self._nic_models = await asyncio.to_thread(_qemu_nic_devices, self.config.qemu_binary)
        return self._nic_models

    async def check_model(self, model: str) -> None:
        device = nic_device(model)
        models = await self.nic_models()
        if device not in models:
            others = [m for m in ("e1000", "e1000e", "rtl8139") if m in models]
            also = f" (or one of: {', '.join(others)})" if others else ""
            raise InvalidInputError(
                f"NIC model {model!r}: this host's QEMU has no NIC device {device!r}; "
                f"use model=virtio{also}"
            )

    async def new_nics(self, options: Iterable[NicOption]) -> tuple[NicSpec, ...]:
        """NICs for a new VM: networks and bridges exist, models exist, MACs free."""
        wanted = list(options)
        if len(wanted) > MAX_NICS:
            raise InvalidInputError(f"a VM has at most {MAX_NICS} NICs, not {len(wanted)}")
        for option in wanted:
            await self.require_bridge(self.get(option.network))
            await self.check_model(option.model)
        taken = self.macs_in_use()
        check_macs([o.mac for o in wanted], taken)
        chosen = {o.mac for o in wanted if o.mac} | set(taken)
        nics = []
        for option in wanted:
            mac = option.mac or generate_mac(chosen)
            chosen.add(mac)
            nics.append(NicSpec(network=option.network, mac=mac, model=option.model))
        return tuple(nics)

    def renew_macs(self, nics: Iterable[NicSpec]) -> tuple[NicSpec, ...]:
        """The same NICs with new MACs (an import as a new VM: ``--mode new-id``)."""
        chosen = set(self.macs_in_use())
        renewed = []
        for nic in nics:
            mac = generate_mac(chosen)
            chosen.add(mac)
            renewed.append(nic.model_copy(update={"mac": mac}))
        return tuple(renewed)

    async def require_bridge(self, net: HostNetwork) -> None:
        if not await asyncio.to_thread(self.links.bridge_exists, net.bridge, net.netns):
            where = f" in namespace {net.netns}" if net.netns else ""
            raise NotFoundError(
                f"network {net.name!r} on host {self.config.name!r}: its bridge "
                f"{net.bridge!r} does not exist{where}; create it or change the network"
            )

    async def check_runnable(self, spec: VmSpec) -> None:
        """Before a QEMU of ``spec`` starts here (start, move, import, failover):
        every NIC's network and bridge exist, and this host's QEMU has its model."""
        for name in dict.fromkeys(nic.network for nic in spec.nics):  # each bridge looked at once
            await self.require_bridge(self.get(name))
        for model in dict.fromkeys(nic.model for nic in spec.nics):
            await self.check_model(model)

    def check_macs_free(self, spec: VmSpec) -> None:
        """A VM arriving with its MACs (a move): none is used by another VM here."""
        taken = self.macs_in_use(except_uuid=spec.uuid)
        for nic in spec.nics:
            if nic.mac in taken:
                raise ConflictError(
                    f"MAC {nic.mac} of VM {spec.name!r} is used by VM {taken[nic.mac]!r} on "
                    f"host {self.config.name!r}: MACs are unique per host; change the other "
                    "VM's NIC or pick another host"
                )

    # -- taps ------------------------------------------------------------------

    def taps(self, spec: VmSpec, slot: int = 0) -> list[str]:
        return vm_taps(self.key, spec.uuid, len(spec.nics), slot)

    def _all_taps(self, spec: VmSpec) -> list[str]:
        return [tap for slot in range(TAP_SLOTS) for tap in self.taps(spec, slot)]

    async def attach(self, spec: VmSpec, slot: int = 0) -> None:
        """Attach each tap of the VM's QEMU in ``slot`` to its network's bridge (idempotent)."""
        for tap, nic in zip(self.taps(spec, slot), spec.nics, strict=True):
            net = self.get(nic.network)
            await asyncio.to_thread(self.links.attach, tap, net.bridge, net.netns)

    async def slot_of(self, spec: VmSpec) -> int:
        """The slot whose taps the VM's running QEMU holds (0 if none is found)."""
        if not spec.nics:
            return 0
        for slot in range(TAP_SLOTS):
            first = self.taps(spec, slot)[0]
            for netns in self._namespaces():
                if await asyncio.to_thread(self.links.link, first, netns) is not None:
                    return slot
        return 0

    def _namespaces(self) -> list[str | None]:
        spaces: list[str | None] = [None]
        spaces += sorted({n.netns for n in self.all().values() if n.netns is not None})
        return spaces

    async def remove_taps(self, spec: VmSpec) -> None:
        """Remove the VM's taps wherever they are (its QEMU has gone)."""
        if not spec.nics:
            return
        taps = frozenset(self._all_taps(spec))
        for netns in self._namespaces():
            # One listing per namespace, not a look per tap name and slot (each
            # an ip process: this runs in a move's switch-over on its source).
            try:
                found = await asyncio.to_thread(self.links.links, netns)
            except NetworkError as exc:
                log.warning("cannot list the links%s: %s", f" in {netns}" if netns else "", exc)
                continue
            for tap in sorted(link.name for link in found if link.name in taps):
                try:
                    await asyncio.to_thread(self.links.delete, tap, netns)
                except NetworkError as exc:
                    log.warning("cannot remove tap %s: %s", tap, exc)

    async def cleanup(self, running: Iterable[VmSpec]) -> list[str]:
        """Remove this host's taps that no running QEMU owns; the names removed."""
        keep = frozenset(tap for spec in running for tap in self._all_taps(spec))
        gone: list[str] = []
        for netns in self._namespaces():
            try:
                gone += await asyncio.to_thread(
                    self.links.delete_matching, tap_prefix(self.key), netns, keep
                )
            except NetworkError as exc:
                log.warning("cannot clean up taps%s: %s", f" in {netns}" if netns else "", exc)
        return gone


def _qemu_nic_devices(qemu_binary: str) -> frozenset[str]:
    try:
        out = subprocess.run([qemu_binary, "-device", "help"], capture_output=True, text=True,
                             timeout=60, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        raise NetworkError(f"cannot list the NIC devices of {qemu_binary}: {exc}") from exc
    return nic_devices(out)
