"""HostNetworks over a real catalog and links in memory (ferry.testing.netdev)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.adapters.catalog import Catalog
from ferry.core.network import NicOption, tap_prefix
from ferry.core.spec import NicSpec, VmSpec
from ferry.errors import ConflictError, InvalidInputError, NetworkError, NotFoundError
from ferry.host.config import HostConfig, NetworkConfig
from ferry.host.networks import HostNetworks
from ferry.testing.netdev import FakeLinks

MODELS = frozenset({"virtio-net-pci", "e1000"})
NS = "ns-lab"


@pytest.fixture
def links() -> FakeLinks:
    fake = FakeLinks()
    fake.add_netns(NS)
    fake.add_bridge("br-lab", NS)
    fake.add_bridge("br0")
    return fake


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    (tmp_path / "data").mkdir()
    cat = Catalog(tmp_path / "data")
    yield cat
    cat.close()


def _networks(
    tmp_path: Path, catalog: Catalog, links: FakeLinks, **toml: NetworkConfig
) -> HostNetworks:
    config = HostConfig(name="host-1", data_dir=tmp_path / "data", tls_dir=tmp_path / "tls",
                        networks=toml)  # fmt: skip
    return HostNetworks(config, catalog, links=links, nic_models=MODELS)


def _vm(name: str, *nics: NicSpec) -> VmSpec:
    return VmSpec(name=name, config_version=3, memory=64 * 1024**2, nics=nics)


def test_add_list_remove(tmp_path: Path, catalog: Catalog, links: FakeLinks) -> None:
    nets = _networks(tmp_path, catalog, links, prod=NetworkConfig(bridge="br0"))
    asyncio.run(nets.add("lab", "br-lab", NS))
    asyncio.run(nets.add("lab", "br-lab", NS))  # the same again: nothing changes
    views = asyncio.run(nets.views())
    assert views == [
        {"name": "lab", "bridge": "br-lab", "netns": NS, "exists": True, "source": "added"},
        {"name": "prod", "bridge": "br0", "netns": None, "exists": True, "source": "host.toml"},
    ]
    # Kept in the catalog: a new HostNetworks (an agent restart) sees it.
    assert "lab" in _networks(tmp_path, catalog, links).all()
    with pytest.raises(ConflictError, match="already has network 'lab'"):
        asyncio.run(nets.add("lab", "br0"))
    with pytest.raises(NotFoundError, match="bridge 'nobr' does not exist"):
        asyncio.run(nets.add("other", "nobr"))
    links.add_tap("tap9")
    with pytest.raises(InvalidInputError, match="'tap9' on host 'host-1' is not a bridge"):
        asyncio.run(nets.add("other", "tap9"))
    links.delete("tap9")
    with pytest.raises(NotFoundError, match="namespace 'ns-gone' does not exist"):
        asyncio.run(nets.add("other", "br-lab", "ns-gone"))
    with pytest.raises(InvalidInputError, match="invalid bridge name"):
        asyncio.run(nets.add("other", "a bridge"))
    with pytest.raises(InvalidInputError, match="invalid network name"):
        asyncio.run(nets.add("no/slash", "br0"))
    with pytest.raises(ConflictError, match=r"host\.toml"):
        nets.remove("prod")
    catalog.add_vm(_vm("web", NicSpec(network="lab", mac="02:00:00:00:00:10")))
    with pytest.raises(ConflictError, match="used by VM"):
        nets.remove("lab")
    catalog.delete(catalog.find("web").uuid)  # type: ignore[union-attr]
    nets.remove("lab")
    assert list(nets.all()) == ["prod"]
    with pytest.raises(NotFoundError, match="no network named 'lab'"):
        nets.remove("lab")
    # A bridge that went away shows as missing.
    links.delete("br0")
    assert asyncio.run(nets.views())[0]["exists"] is False


def test_new_nics_choose_macs_once_and_check_everything(
    tmp_path: Path, catalog: Catalog, links: FakeLinks
) -> None:
    nets = _networks(tmp_path, catalog, links, lab=NetworkConfig(bridge="br-lab", netns=NS))
    catalog.add_vm(_vm("web", NicSpec(network="lab", mac="02:00:00:00:00:10")))
    given = NicOption("lab", mac="02:00:00:00:00:20", model="e1000")
    nics = asyncio.run(nets.new_nics([given, NicOption("lab"), NicOption("lab")]))
    assert nics[0] == NicSpec(network="lab", mac="02:00:00:00:00:20", model="e1000")
    macs = [n.mac for n in nics]
    assert len(set(macs)) == 3 and "02:00:00:00:00:10" not in macs
    with pytest.raises(InvalidInputError, match="already used by VM 'web'"):
        asyncio.run(nets.new_nics([NicOption("lab", mac="02:00:00:00:00:10")]))
    with pytest.raises(InvalidInputError, match="two NICs"):
        asyncio.run(nets.new_nics([given, given]))
    with pytest.raises(InvalidInputError, match="no NIC device 'rtl8139'"):
        asyncio.run(nets.new_nics([NicOption("lab", model="rtl8139")]))
    with pytest.raises(NotFoundError, match="no network named 'prod'"):
        asyncio.run(nets.new_nics([NicOption("prod")]))
    with pytest.raises(InvalidInputError, match="at most 8 NICs"):
        asyncio.run(nets.new_nics([NicOption("lab")] * 9))
    links.delete("br-lab", NS)
    with pytest.raises(NotFoundError, match="its bridge 'br-lab' does not exist in namespace"):
        asyncio.run(nets.new_nics([NicOption("lab")]))
    with pytest.raises(NotFoundError, match="its bridge 'br-lab' does not exist"):
        asyncio.run(nets.check_runnable(_vm("web2", *nics)))
    # An import as a new VM: new MACs, nothing else changes.
    renewed = nets.renew_macs(nics)
    assert [n.network for n in renewed] == ["lab"] * 3 and renewed[0].model == "e1000"
    assert not {n.mac for n in renewed} & {*macs, "02:00:00:00:00:10"}


def test_taps_attach_move_into_the_namespace_and_leftovers_go(
    tmp_path: Path, catalog: Catalog, links: FakeLinks
) -> None:
    nets = _networks(tmp_path, catalog, links, lab=NetworkConfig(bridge="br-lab", netns=NS),
                     prod=NetworkConfig(bridge="br0"))  # fmt: skip
    spec = _vm("web", NicSpec(network="lab", mac="02:00:00:00:00:10"),
               NicSpec(network="prod", mac="02:00:00:00:00:11"))  # fmt: skip
    lab_tap, prod_tap = nets.taps(spec)
    with pytest.raises(NetworkError, match="does not exist"):
        asyncio.run(nets.attach(spec))  # QEMU made no taps
    for tap in (lab_tap, prod_tap):
        links.add_tap(tap)  # as QEMU makes them
    asyncio.run(nets.attach(spec))
    assert links.names(NS) == ["br-lab", lab_tap] and links.names() == ["br0", prod_tap]
    assert links.link(lab_tap, NS).master == "br-lab"  # type: ignore[union-attr]
    assert links.link(prod_tap).master == "br0"  # type: ignore[union-attr]
    asyncio.run(nets.attach(spec))  # again: already so
    assert asyncio.run(nets.slot_of(spec)) == 0

    # A refresh's new QEMU holds the other slot; the old one's taps go with it.
    fresh = nets.taps(spec, 1)
    assert not set(fresh) & {lab_tap, prod_tap}
    for tap in fresh:
        links.add_tap(tap)
    asyncio.run(nets.attach(spec, 1))
    links.delete(lab_tap, NS)
    links.delete(prod_tap)
    assert asyncio.run(nets.slot_of(spec)) == 1

    # Agent start: taps of this host's prefix that nothing holds go; taps of
    # another prefix, and taps a live process holds (another host's with the
    # same key, or a QEMU not known here), stay.
    stray = tap_prefix(nets.key) + "deadbeef0"
    held = tap_prefix(nets.key) + "0123abcd0"
    links.add_tap(stray, persistent=True)
    links.add_tap(held)
    links.add_tap("ft0000deadbeef0", persistent=True)
    links.add_tap(tap_prefix(nets.key) + "cafecafe0", NS, persistent=True)
    gone = asyncio.run(nets.cleanup([spec]))
    assert sorted(gone) == sorted([stray, tap_prefix(nets.key) + "cafecafe0"])
    assert links.names() == sorted(["br0", fresh[1], held, "ft0000deadbeef0"])
    assert links.names(NS) == ["br-lab", fresh[0]]
    links.delete(held)

    # The QEMU ended: whatever of its taps is left goes, in every namespace and slot.
    asyncio.run(nets.remove_taps(spec))
    assert links.names() == ["br0", "ft0000deadbeef0"] and links.names(NS) == ["br-lab"]


def test_check_runnable_refuses_a_model_this_hosts_qemu_lacks(
    tmp_path: Path, catalog: Catalog, links: FakeLinks
) -> None:
    """Start, move, import and failover all ask check_runnable: the model is checked there."""
    nets = _networks(tmp_path, catalog, links, lab=NetworkConfig(bridge="br-lab", netns=NS))
    asyncio.run(nets.check_runnable(_vm("web", NicSpec(network="lab", mac="02:00:00:00:00:30",
                                                       model="e1000"))))  # fmt: skip
    arriving = _vm("web", NicSpec(network="lab", mac="02:00:00:00:00:30"),
                   NicSpec(network="lab", mac="02:00:00:00:00:31", model="rtl8139"))  # fmt: skip
    with pytest.raises(InvalidInputError, match="NIC model 'rtl8139': this host's QEMU has no"):
        asyncio.run(nets.check_runnable(arriving))
