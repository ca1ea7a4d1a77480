"""Host networks, NICs and the lab network, for real: bridges, taps, namespaces, guests.

One lab of two hosts for the module. Its network ``lab`` is a bridge in the
lab's own namespace; test guests with a NIC on it take the address their MAC
names and answer TCP echo on port 7 to a peer run by ``ferry lab exec``.
Spare bridges live in a namespace this module makes and deletes.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.adapters import netdev
from ferry.core.network import guest_ip_of
from tests.conftest import LabEnv, lab_session

BOOT_TIMEOUT_S = 240  # a TCG boot on a loaded machine
GUEST_MEMORY = "128M"

# Run inside the lab namespace: connect to HOST:7 (retrying while the guest
# boots), send each line and read it back; print what came back.
ECHO_CLIENT = r"""
import socket, sys, time
host, lines = sys.argv[1], sys.argv[2:]
deadline = time.monotonic() + 120
while True:
    try:
        conn = socket.create_connection((host, 7), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
conn.settimeout(60)
got = b""
for line in lines:
    conn.sendall(line.encode() + b"\n")
    want = len(got) + len(line) + 1
    while len(got) < want:
        chunk = conn.recv(4096)
        if not chunk:
            sys.exit("connection closed early")
        got += chunk
conn.close()
sys.stdout.write(got.decode())
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, guest_cache: Path) -> Iterator[LabEnv]:
    with lab_session(tmp_path_factory.mktemp("lab")) as lab_env:
        lab_env.lab.up(2)
        yield lab_env


@pytest.fixture(scope="module")
def spare_ns() -> Iterator[str]:
    """A network namespace of this module's own with bridge ``tbr0``; deleted afterwards."""
    name = f"ferry-test-net-{os.getpid()}"
    netdev.add_netns(name)
    try:
        netdev.add_bridge("tbr0", name)
        yield name
    finally:
        netdev.delete_netns(name)
    assert not netdev.netns_exists(name)


def _taps_of(env: LabEnv, uuid: str, *extra_ns: str) -> dict[str, list[str]]:
    """Links named for the VM (its uuid's first 8 hex) in the root and lab namespaces."""
    mark = uuid.replace("-", "")[:8]
    found: dict[str, list[str]] = {}
    for ns in (None, env.lab.netns, *extra_ns):
        names = [link.name for link in netdev.links(ns) if mark in link.name]
        if names:
            found[ns or "root"] = names
    return found


def _echo(env: LabEnv, ip: str, *lines: str) -> str:
    result = env.cli("lab", "exec", "--dir", str(env.lab.root), "--",
                     sys.executable, "-c", ECHO_CLIENT, ip, *lines, timeout=240)  # fmt: skip
    return result.stdout


def _wait_up(env: LabEnv, name: str, boots: int = 1) -> str:
    return env.wait_console(name, lambda t: t.count("ferry-guest up") >= boots,
                            timeout=BOOT_TIMEOUT_S)  # fmt: skip


def _vm_names(env: LabEnv, host: str) -> list[str]:
    return sorted(vm["name"] for vm in env.cli.json("vm", "list", "--host", host))


def _vm_dirs(env: LabEnv, index: int) -> list[str]:
    vms = env.lab.host(index).data_dir / "vms"
    return sorted(p.name for p in vms.iterdir()) if vms.is_dir() else []


def test_lab_up_makes_network_lab_on_every_host(env: LabEnv) -> None:
    assert netdev.netns_exists(env.lab.netns)
    assert netdev.bridge_exists(env.lab.bridge, env.lab.netns)
    assert not netdev.bridge_exists(env.lab.bridge)  # nothing of it in the root namespace
    rows = env.cli.json("host", "network", "list")
    assert sorted((r["host"], r["name"]) for r in rows) == [("host-1", "lab"), ("host-2", "lab")]
    for row in rows:
        assert row["bridge"] == env.lab.bridge and row["netns"] == env.lab.netns
        assert row["exists"] is True
    facts = env.cli.json("host", "show", "host-1")
    assert [(n["name"], n["exists"]) for n in facts["networks"]] == [("lab", True)]
    assert "network: lab -> bridge" in env.cli("host", "show", "host-1").stdout
    status = env.cli.json("lab", "status", "--dir", str(env.lab.root))
    assert status["network"] == {"name": "lab", "netns": env.lab.netns,
                                 "bridge": env.lab.bridge, "up": True}  # fmt: skip


def test_lab_up_sweeps_the_namespace_of_a_lab_whose_dir_is_gone(
    env: LabEnv, tmp_path: Path
) -> None:
    gone_dir, live_dir = tmp_path / "gone-lab", tmp_path / "live-lab"
    live_dir.mkdir()
    made = []
    try:
        for name, root in (("ferry-lab-0rphan00", gone_dir), ("ferry-lab-11ve0000", live_dir)):
            netdev.add_netns(name)
            made.append(name)
            bridge = "fl" + name.removeprefix("ferry-lab-")
            netdev.add_bridge(bridge, name)
            netdev.set_alias(bridge, str(root), name)
        env.lab.up(2)
        assert not netdev.netns_exists("ferry-lab-0rphan00")
        assert netdev.netns_exists("ferry-lab-11ve0000")  # its lab dir is still there
        assert netdev.netns_exists(env.lab.netns)
    finally:
        for name in made:
            netdev.delete_netns(name)


def test_guest_with_a_nic_answers_echo_and_keeps_its_mac(env: LabEnv) -> None:
    env.cli("vm", "create", "echo1", "--host", "host-1", "--guest", "test",
            "--memory", GUEST_MEMORY, "--nic", "lab", "--start")  # fmt: skip
    vm = env.vm("echo1")
    [nic] = vm["nics"]
    mac, ip = nic["mac"], nic["ip"]
    assert nic["network"] == "lab" and nic["model"] == "virtio"
    assert int(mac[:2], 16) & 0x03 == 0x02  # locally administered unicast
    assert ip == guest_ip_of(mac)
    console = _wait_up(env, "echo1")
    assert f"ferry-guest net eth0 {mac} {ip}" in console
    # The tap is on the lab's bridge, inside the lab's namespace only.
    taps = _taps_of(env, vm["uuid"])
    assert list(taps) == [env.lab.netns], taps
    [tap] = taps[env.lab.netns]
    link = netdev.link(tap, env.lab.netns)
    assert link is not None and link.master == env.lab.bridge and link.up
    assert _echo(env, ip, "hello", "every line comes back", "x" * 500) == (
        "hello\nevery line comes back\n" + "x" * 500 + "\n"
    )

    # Stop: the tap goes with its QEMU; the MAC stays.
    env.cli("vm", "stop", "echo1")
    assert _taps_of(env, vm["uuid"]) == {}
    assert env.vm("echo1")["nics"][0]["mac"] == mac
    env.cli("vm", "start", "echo1")
    assert env.vm("echo1")["nics"] == [nic]
    _wait_up(env, "echo1")
    assert _echo(env, ip, "after a restart") == "after a restart\n"

    # An agent restart: the VM runs on, its tap stays attached, the MAC stays.
    env.kill_agent(1)
    env.lab.up(2)
    after = env.vm("echo1")
    assert after["state"] == "running" and after["nics"] == [nic]
    link = netdev.link(tap, env.lab.netns)
    assert link is not None and link.master == env.lab.bridge
    assert _echo(env, ip, "after the agent came back") == "after the agent came back\n"

    # Kill and delete: nothing of the NIC is left.
    env.cli("vm", "kill", "echo1")
    assert _taps_of(env, vm["uuid"]) == {}
    env.cli("vm", "start", "echo1")
    assert _taps_of(env, vm["uuid"]) == {env.lab.netns: [tap]}
    env.cli("vm", "delete", "echo1", "--force")
    assert _taps_of(env, vm["uuid"]) == {}


def test_agent_restart_reattaches_a_tap_and_removes_leftovers(env: LabEnv) -> None:
    env.cli("vm", "create", "echo2", "--host", "host-2", "--guest", "test",
            "--memory", GUEST_MEMORY, "--nic", "lab,mac=02:00:00:00:12:34",
            "--nic", "lab", "--start")  # fmt: skip
    vm = env.vm("echo2")
    first, second = vm["nics"]
    assert first["mac"] == "02:00:00:00:12:34" and first["ip"] == "10.213.18.52"
    assert second["mac"] != first["mac"] and second["ip"] != first["ip"]
    taps = _taps_of(env, vm["uuid"])[env.lab.netns]
    assert len(taps) == 2
    # As if the agent died between QEMU's start and the attach: a tap off its
    # bridge; and a leftover tap of this host that no QEMU owns.
    env.kill_agent(2)
    netdev._ip("link", "set", taps[0], "nomaster", netns=env.lab.netns)
    leftover = taps[0][:-6] + "dead00"  # this host's prefix, no VM of it
    netdev._ip("tuntap", "add", "mode", "tap", "name", leftover)
    try:
        env.lab.up(2)
        assert netdev.link(leftover) is None
    finally:
        netdev.delete(leftover)
    for tap in taps:
        link = netdev.link(tap, env.lab.netns)
        assert link is not None and link.master == env.lab.bridge, tap
    _wait_up(env, "echo2")
    assert _echo(env, "10.213.18.52", "through two NICs") == "through two NICs\n"
    assert _echo(env, second["ip"], "the second one too") == "the second one too\n"
    # A refresh to a fresh QEMU on this host: the new one takes the other tap names.
    report = env.cli.json("host", "refresh-vms", "host-2")
    assert [r["vm"] for r in report["results"] if "error" not in r] == ["echo2"], report
    now = _taps_of(env, vm["uuid"])[env.lab.netns]
    assert len(now) == 2 and not set(now) & set(taps)
    assert _echo(env, "10.213.18.52", "after a refresh") == "after a refresh\n"
    env.cli("vm", "delete", "echo2", "--force")
    assert _taps_of(env, vm["uuid"]) == {}


def test_host_network_add_list_remove(env: LabEnv, spare_ns: str) -> None:
    env.cli("host", "network", "add", "spare", "--bridge", "tbr0", "--netns", spare_ns,
            "--host", "host-2")  # fmt: skip
    rows = {r["name"]: r for r in env.cli.json("host", "network", "list", "--host", "host-2")}
    assert rows["spare"] == {"host": "host-2", "name": "spare", "bridge": "tbr0",
                             "netns": spare_ns, "exists": True, "source": "added"}  # fmt: skip
    # Adding the same again is a no-op; another bridge under that name is refused.
    env.cli("host", "network", "add", "spare", "--bridge", "tbr0", "--netns", spare_ns,
            "--host", "host-2")  # fmt: skip
    line = env.cli.fails("host", "network", "add", "spare", "--bridge", env.lab.bridge,
                         "--netns", env.lab.netns, "--host", "host-2")  # fmt: skip
    assert "already has network 'spare'" in line
    env.cli("vm", "create", "user", "--host", "host-2", "--memory", "64M", "--nic", "spare")
    line = env.cli.fails("host", "network", "remove", "spare", "--host", "host-2")
    assert "used by VM(s) user" in line
    env.cli("vm", "delete", "user")
    env.cli("host", "network", "remove", "spare", "--host", "host-2")
    names = [r["name"] for r in env.cli.json("host", "network", "list", "--host", "host-2")]
    assert names == ["lab"]
    assert "no network named 'spare'" in env.cli.fails(
        "host", "network", "remove", "spare", "--host", "host-2"
    )


def test_host_toml_network(env: LabEnv, spare_ns: str) -> None:
    env.restart_agent(2, networks={"fixed": {"bridge": "tbr0", "netns": spare_ns}})
    try:
        facts = env.cli.json("host", "show", "host-2")
        fixed = next(n for n in facts["networks"] if n["name"] == "fixed")
        assert fixed == {"name": "fixed", "bridge": "tbr0", "netns": spare_ns, "exists": True,
                         "source": "host.toml"}  # fmt: skip
        line = env.cli.fails("host", "network", "remove", "fixed", "--host", "host-2")
        assert "host.toml" in line
    finally:
        env.restart_agent(2, networks={})
    assert [n["name"] for n in env.cli.json("host", "show", "host-2")["networks"]] == ["lab"]


def test_export_and_import_keep_the_macs_new_id_gives_new_ones(env: LabEnv) -> None:
    env.cli("vm", "create", "carried", "--host", "host-1", "--memory", "64M", "--disk", "16M",
            "--nic", "lab", "--nic", "lab,mac=02:00:00:00:bb:01")  # fmt: skip
    nics = env.vm("carried")["nics"]
    folder = env.lab.images_dir / "carried-export"
    env.cli("vm", "export", "carried", "--to", str(folder))
    try:
        env.cli("vm", "import", str(folder), "--host", "host-2", "--mode", "copy")
        assert env.vm("carried", "host-2")["nics"] == nics
        env.cli("vm", "import", str(folder), "--host", "host-2", "--mode", "new-id",
                "--name", "fresh")  # fmt: skip
        fresh = env.vm("fresh")["nics"]
        assert [(n["network"], n["model"]) for n in fresh] == [("lab", "virtio")] * 2
        assert not {n["mac"] for n in fresh} & {n["mac"] for n in nics}
    finally:
        for name, host in (("carried", "host-1"), ("carried", "host-2"), ("fresh", "host-2")):
            env.cli("vm", "delete", name, "--host", host, check=False)
        shutil.rmtree(folder, ignore_errors=True)


def _refused(env: LabEnv, *args: str) -> str:
    """A vm create on host-1 that must fail with one line and change nothing."""
    before, dirs = _vm_names(env, "host-1"), _vm_dirs(env, 1)
    line = env.cli.fails("vm", "create", "bad", "--host", "host-1", "--guest", "test",
                         "--memory", GUEST_MEMORY, *args)  # fmt: skip
    assert _vm_names(env, "host-1") == before
    assert _vm_dirs(env, 1) == dirs
    return line


def test_bad_nics_are_refused_with_one_line(env: LabEnv, spare_ns: str) -> None:
    line = _refused(env, "--nic", "nowhere")
    assert "no network named 'nowhere' on host 'host-1'" in line and "known: lab" in line
    assert "malformed MAC '12:34'" in _refused(env, "--nic", "lab,mac=12:34")
    assert "multicast" in _refused(env, "--nic", "lab,mac=01:00:5e:00:00:01")
    line = _refused(env, "--nic", "lab,mac=02:00:00:00:aa:01", "--nic", "lab,mac=02:00:00:00:aa:01")
    assert "given to two NICs" in line
    env.cli("vm", "create", "owner", "--host", "host-1", "--memory", "64M",
            "--nic", "lab,mac=02:00:00:00:aa:02")  # fmt: skip
    line = _refused(env, "--nic", "lab,mac=02:00:00:00:AA:02")
    assert "MAC 02:00:00:00:aa:02 is already used by VM 'owner'" in line
    env.cli("vm", "delete", "owner")
    line = _refused(env, "--nic", "lab,model=ne2k_isa")  # an ISA card: not on q35's PCI bus
    assert "NIC model 'ne2k_isa'" in line
    assert "no NIC device 'nosuch'" in _refused(env, "--nic", "lab,model=nosuch")
    env.cli("vm", "create", "intel", "--host", "host-1", "--memory", "64M",
            "--nic", "lab,model=e1000")  # fmt: skip
    assert [n["model"] for n in env.vm("intel")["nics"]] == ["e1000"]
    env.cli("vm", "delete", "intel")
    assert "--nic" in _refused(env, "--nic", "lab,speed=10G")

    # A bridge that does not exist: refused as a network, and as a NIC's once it vanished.
    line = env.cli.fails("host", "network", "add", "nobr", "--bridge", "nosuchbr0",
                         "--host", "host-1")  # fmt: skip
    assert "bridge 'nosuchbr0' does not exist on host 'host-1'" in line
    assert "invalid bridge name" in env.cli.fails(
        "host", "network", "add", "nobr", "--bridge", "much-too-long-name", "--host", "host-1"
    )
    netdev.add_bridge("tbr1", spare_ns)
    env.cli("host", "network", "add", "brief", "--bridge", "tbr1", "--netns", spare_ns,
            "--host", "host-1")  # fmt: skip
    netdev.delete("tbr1", spare_ns)
    try:
        rows = env.cli.json("host", "network", "list", "--host", "host-1")
        assert next(r for r in rows if r["name"] == "brief")["exists"] is False
        line = _refused(env, "--nic", "brief")
        assert "its bridge 'tbr1' does not exist in namespace" in line
    finally:
        env.cli("host", "network", "remove", "brief", "--host", "host-1")
    assert [r["name"] for r in env.cli.json("host", "network", "list", "--host", "host-1")] == [
        "lab"
    ]


def test_start_refused_when_the_bridge_is_gone(env: LabEnv, spare_ns: str) -> None:
    netdev.add_bridge("tbr2", spare_ns)
    env.cli("host", "network", "add", "fleeting", "--bridge", "tbr2", "--netns", spare_ns,
            "--host", "host-1")  # fmt: skip
    env.cli("vm", "create", "stranded", "--host", "host-1", "--guest", "test",
            "--memory", GUEST_MEMORY, "--nic", "fleeting")  # fmt: skip
    try:
        netdev.delete("tbr2", spare_ns)
        line = env.cli.fails("vm", "start", "stranded")
        assert "its bridge 'tbr2' does not exist" in line
        vm: dict[str, Any] = env.vm("stranded")
        assert vm["state"] != "running" and vm["pid"] is None
        assert _taps_of(env, vm["uuid"], spare_ns) == {}
    finally:
        env.cli("vm", "delete", "stranded", "--force")
        env.cli("host", "network", "remove", "fleeting", "--host", "host-1")


def test_lab_down_removes_the_taps_and_the_namespace(env: LabEnv) -> None:
    """Last in the module: the lab goes down under a running guest with a NIC."""
    env.cli("vm", "create", "last", "--host", "host-1", "--guest", "test",
            "--memory", GUEST_MEMORY, "--nic", "lab", "--start")  # fmt: skip
    uuid = env.vm("last")["uuid"]
    assert _taps_of(env, uuid) != {}
    env.lab.down()
    assert not netdev.netns_exists(env.lab.netns)
    assert env.cli.json("lab", "status", "--dir", str(env.lab.root))["network"]["up"] is False
    mark = uuid.replace("-", "")[:8]
    assert [link.name for link in netdev.links() if mark in link.name] == []
