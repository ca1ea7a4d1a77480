"""Network maps and the pre-flight network check of moves, imports and replicas (pure)."""

import pytest

from ferry.core.network import (
    apply_network_map,
    check_network_map,
    check_networks,
    missing_networks,
    network_refusal,
    parse_network_map,
    reverse_network_map,
    vm_networks,
)
from ferry.core.spec import NicSpec, VmSpec
from ferry.errors import InvalidInputError

MAC1, MAC2, MAC3 = "02:00:00:00:01:01", "02:00:00:00:01:02", "02:00:00:00:01:03"


def _vm(*networks: str) -> VmSpec:
    macs = iter((MAC1, MAC2, MAC3))
    nics = tuple(NicSpec(network=name, mac=next(macs)) for name in networks)
    return VmSpec(name="web", config_version=3, memory=256 * 1024**2, nics=nics)


def test_parse_network_map_reads_repeated_pairs() -> None:
    assert parse_network_map([]) == {}
    assert parse_network_map(["prod=lab", " dmz = lab2 "]) == {"prod": "lab", "dmz": "lab2"}
    assert parse_network_map(["prod=lab", "prod=lab"]) == {"prod": "lab"}


@pytest.mark.parametrize(
    ("items", "words"),
    [
        (["prod"], "write SRC=DST"),
        (["=lab"], "write SRC=DST"),
        (["prod="], "write SRC=DST"),
        (["prod=la b"], "'la b' is not a network name"),
        (["-x=lab"], "'-x' is not a network name"),
        (["prod=lab", "prod=dmz"], "maps network 'prod' twice ('lab' and 'dmz')"),
    ],
)
def test_parse_network_map_refuses_bad_items_in_one_line(items: list[str], words: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        parse_network_map(items)
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)


def test_check_network_map_checks_a_json_map_the_same_way() -> None:
    assert check_network_map({"prod": "lab"}) == {"prod": "lab"}
    with pytest.raises(InvalidInputError, match="not a network name"):
        check_network_map({"prod": "a/b"})


def test_vm_networks_each_once_in_nic_order() -> None:
    assert vm_networks(_vm()) == []
    assert vm_networks(_vm("lab", "dmz", "lab")) == ["lab", "dmz"]


def test_missing_networks_looks_up_mapped_names() -> None:
    spec = _vm("prod", "dmz")
    assert missing_networks(spec, ["prod", "dmz"], {}) == []
    assert missing_networks(spec, ["lab"], {}) == ["prod", "dmz"]
    assert missing_networks(spec, ["lab", "dmz"], {"prod": "lab"}) == []
    # Two networks mapped onto one that the host lacks: named once.
    assert missing_networks(spec, [], {"prod": "x", "dmz": "x"}) == ["x"]
    assert missing_networks(_vm(), [], {}) == []


def test_refusal_names_the_missing_network_and_the_remedy() -> None:
    refusal = network_refusal(_vm("prod"), host="host-2", host_networks=["lab"], network_map={})
    assert refusal is not None
    assert "host 'host-2' has no network 'prod', which VM 'web' uses" in refusal
    assert "--network-map prod=NETWORK" in refusal


def test_refusal_names_a_map_destination_that_does_not_exist() -> None:
    refusal = network_refusal(_vm("prod"), host="host-2", host_networks=["lab"],
                              network_map={"prod": "nowhere"})  # fmt: skip
    assert refusal is not None
    assert "host 'host-2' has no network 'nowhere' (--network-map prod=nowhere)" in refusal


def test_refusal_names_a_map_source_the_vm_does_not_use() -> None:
    refusal = network_refusal(_vm("lab"), host="host-2", host_networks=["lab", "x"],
                              network_map={"lba": "x"})  # fmt: skip
    assert refusal == "--network-map names network 'lba', which VM 'web' does not use (it uses lab)"
    refusal = network_refusal(_vm(), host="h", host_networks=[], network_map={"a": "b"})
    assert refusal is not None and "(it uses no network)" in refusal


def test_no_refusal_when_every_network_is_there() -> None:
    assert network_refusal(_vm("lab"), host="h", host_networks=["lab"], network_map={}) is None
    check_networks(_vm("prod"), host="h", host_networks=["lab"], network_map={"prod": "lab"})
    with pytest.raises(InvalidInputError, match="no network 'prod'"):
        check_networks(_vm("prod"), host="h", host_networks=["lab"], network_map={})


def test_apply_network_map_keeps_macs_and_models() -> None:
    spec = _vm("prod", "dmz")
    moved = apply_network_map(spec, {"prod": "lab"})
    assert [(n.network, n.mac, n.model) for n in moved.nics] == [
        ("lab", MAC1, "virtio"), ("dmz", MAC2, "virtio")]  # fmt: skip
    assert moved.uuid == spec.uuid and moved.name == spec.name
    assert apply_network_map(spec, {}) is spec


def test_reverse_network_map_goes_back_to_the_first_source() -> None:
    assert reverse_network_map({"prod": "lab", "dmz": "lab2"}) == {"lab": "prod", "lab2": "dmz"}
    assert reverse_network_map({"a": "x", "b": "x"}) == {"x": "a"}
    spec = _vm("prod", "dmz")
    there = apply_network_map(spec, {"prod": "lab"})
    assert apply_network_map(there, reverse_network_map({"prod": "lab"})).nics == spec.nics
