"""Networks that follow a VM: TCP across live moves, the network checks and maps, failovers.

A real lab: two agents, the lab network (one bridge in the lab's namespace,
network ``lab`` on both hosts), the test guest with a NIC serving TCP echo
on port 7, and a peer in the lab namespace (``ferry lab exec``) that keeps
one TCP connection to it. The lab's bridge also goes by ``prod`` on host-2
and ``dmz`` on host-1 only, so maps and refusals have real networks to name.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ferry.testing.echo_peer import PeerProcess
from tests.conftest import UP, LabEnv, lab_session, seqs

pytestmark = pytest.mark.integration

RARP_PER_ANNOUNCE = 5  # QEMU's announce: five rounds, one RARP frame per NIC each


@pytest.fixture(scope="module")
def net_env(tmp_path_factory: pytest.TempPathFactory, guest_cache: Path) -> Iterator[LabEnv]:
    """Two lab hosts with the lab network, extra names for its bridge, replica servers."""
    with lab_session(tmp_path_factory.mktemp("lab")) as env:
        env.lab.up(2)
        bridge = ["--bridge", env.lab.bridge, "--netns", env.lab.netns]
        env.cli("host", "network", "add", "prod", *bridge, "--host", "host-2")
        env.cli("host", "network", "add", "dmz", *bridge, "--host", "host-1")
        root = tmp_path_factory.mktemp("replicas")
        for me, other in (("host-1", "host-2"), ("host-2", "host-1")):
            env.cli("replica-server", "enable", "--host", me, "--storage", str(root / me),
                    "--allow", other)  # fmt: skip
        yield env


@contextmanager
def echo_peer(env: LabEnv, name: str, host: str | None = None) -> Iterator[PeerProcess]:
    """A peer in the lab namespace with one TCP connection to the guest's echo port."""
    (nic,) = env.vm(name, host)["nics"]
    peer = PeerProcess([sys.executable, "-m", "ferry", "lab", "exec", "--", sys.executable,
                        "-m", "ferry.testing.echo_peer", nic["ip"], "--mac", nic["mac"],
                        "--bridge", env.lab.bridge])  # fmt: skip
    try:
        ready = peer.wait_ready(180)
        assert ready["event"] == "ready", f"the peer never got an echo: {ready}"
        yield peer
    finally:
        peer.close()


def boot_with_nic(env: LabEnv, name: str, *extra: str) -> dict[str, Any]:
    env.cli("vm", "create", name, "--host", "host-1", "--guest", "test", "--memory", "128M",
            "--disk", "32M", "--nic", "lab", "--start", *extra)  # fmt: skip
    env.wait_console(name, lambda t: "ferry-guest net eth0" in t and len(seqs(t)) >= 1,
                     timeout=180)  # fmt: skip
    return env.vm(name)


def move(env: LabEnv, name: str, to: str, *extra: str) -> dict[str, Any]:
    out = env.cli("vm", "move", name, "--to", to, "--json", *extra).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    assert result["result"] == "ok" and result["host"] == to, result
    return result


def wait_for(get: Callable[[], Any], done: Callable[[Any], bool], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = get()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def test_a_tcp_connection_survives_moves_both_ways_shared_and_copy(net_env: LabEnv) -> None:
    env = net_env
    vm = boot_with_nic(env, "echo", "--volume", "shared")
    (nic,) = vm["nics"]
    with echo_peer(env, "echo") as peer:
        seen = peer.mark()
        for to, storage in (("host-2", "shared"), ("host-1", "shared"),
                            ("host-2", "copy"), ("host-1", "copy")):  # fmt: skip
            result = move(env, "echo", to, "--storage", storage)
            assert result["storage"] == storage
            there = env.vm("echo")
            assert there["host"] == to and there["nics"] == [nic]  # same network, MAC, address
            # The destination announced the VM after its cont: besides QEMU's own
            # announce at the end of the incoming migration, one more round of five.
            # Echoes flow again after the move (the announce can now come first: the
            # destination starts the guest the moment its load completes).
            wanted = seen["rarp"] + 2 * RARP_PER_ANNOUNCE
            now = wait_for(peer.mark, lambda m, at=wanted, got=seen["received"]:
                           (m["rarp"] >= at and m["received"] > got) or bool(m["error"]),
                           timeout=30)  # fmt: skip
            assert now["error"] is None, now
            assert now["rarp"] - seen["rarp"] >= 2 * RARP_PER_ANNOUNCE, (seen, now)
            assert now["received"] > seen["received"], (seen, now)
            seen = now
        report = peer.stop()
    # One connection throughout, every byte echoed, in order.
    assert report["error"] is None, report
    assert report["in_order"] and report["received"] == report["sent"] > 0, report
    assert not UP.search(env.console("echo"))  # no reboot here: the same guest run
    env.cli("vm", "delete", "echo", "--force")


def test_moves_imports_and_replication_are_refused_without_the_network(
    net_env: LabEnv,
) -> None:
    env, cli = net_env, net_env.cli
    # A VM on network 'dmz', which only host-1 has; SeaBIOS alone, nothing to boot.
    cli("vm", "create", "walled", "--host", "host-1", "--memory", "64M", "--disk", "16M",
        "--nic", "dmz")  # fmt: skip
    (nic,) = env.vm("walled")["nics"]

    # Import: refused before the job starts, one line naming the network.
    folder = env.lab.images_dir / "walled-export"
    cli("vm", "export", "walled", "--to", str(folder))
    jobs_before = len(cli.json("job", "list", "--host", "host-2"))
    line = cli.fails("vm", "import", str(folder), "--host", "host-2", "--name", "walled2")
    assert "host 'host-2' has no network 'dmz'" in line and "--network-map dmz=" in line
    line = cli.fails("vm", "import", str(folder), "--host", "host-2", "--name", "walled2",
                     "--network-map", "dmz=nowhere")  # fmt: skip
    assert "host 'host-2' has no network 'nowhere' (--network-map dmz=nowhere)" in line
    assert len(cli.json("job", "list", "--host", "host-2")) == jobs_before  # nothing started
    assert [v["name"] for v in cli.json("vm", "list", "--host", "host-2")] == []
    # Mapped: the copy is on 'prod' there; --mode new-id gives it a new MAC.
    cli("vm", "import", str(folder), "--host", "host-2", "--name", "walled2", "--mode",
        "new-id", "--network-map", "dmz=prod")  # fmt: skip
    (copied,) = env.vm("walled2", "host-2")["nics"]
    assert copied["network"] == "prod" and copied["mac"] != nic["mac"]
    cli("vm", "delete", "walled2", "--host", "host-2")

    cli("vm", "start", "walled")
    # Replication: the replica host refuses the offer; nothing is kept on either side.
    line = cli.fails("replication", "enable", "walled", "--replica", "host-2")
    assert "host 'host-2' has no network 'dmz', which VM 'walled' uses" in line
    assert "not replicated" in cli.fails("replication", "status", "walled")
    assert [v["name"] for v in cli.json("vm", "list", "--host", "host-2")] == []

    # Move: refused before the job exists, the VM runs on where it was.
    moves = [j for j in cli.json("job", "list", "--host", "host-1") if j["kind"] == "move"]
    line = cli.fails("vm", "move", "walled", "--to", "host-2")
    assert "host 'host-2' has no network 'dmz', which VM 'walled' uses" in line
    line = cli.fails("vm", "move", "walled", "--to", "host-2", "--network-map", "dmz=nowhere")
    assert "host 'host-2' has no network 'nowhere' (--network-map dmz=nowhere)" in line
    line = cli.fails("vm", "move", "walled", "--to", "host-2", "--network-map", "lba=prod")
    assert "names network 'lba', which VM 'walled' does not use (it uses dmz)" in line
    line = cli.fails("vm", "move", "walled", "--to", "host-2", "--network-map", "dmz")
    assert "write SRC=DST" in line
    assert [j for j in cli.json("job", "list", "--host", "host-1")
            if j["kind"] == "move"] == moves  # fmt: skip
    vm = env.vm("walled")
    assert vm["host"] == "host-1" and vm["state"] == "running" and vm["nics"] == [nic]

    # Mapped, the move goes: the NIC is on 'prod' there, with the same MAC.
    move(env, "walled", "host-2", "--network-map", "dmz=prod")
    (moved,) = env.vm("walled")["nics"]
    assert moved["network"] == "prod" and moved["mac"] == nic["mac"]
    cli("vm", "delete", "walled", "--force")


def test_failover_networks_test_network_planned_and_unplanned_failovers_keep_the_macs(
    net_env: LabEnv,
) -> None:
    env, cli = net_env, net_env.cli
    vm = boot_with_nic(env, "guarded")
    (nic,) = vm["nics"]
    try:
        # Failovers on host-2 put the NIC on 'prod' there (the same LAN here).
        cli("replication", "enable", "guarded", "--replica", "host-2", "--frequency", "30s",
            "--network-map", "lab=prod")  # fmt: skip
        replica = env.vm("guarded", "host-2")
        assert replica["state"] == "replica"
        assert [(n["network"], n["mac"]) for n in replica["nics"]] == [("prod", nic["mac"])]
        line = cli.fails("replication", "set", "guarded", "--network-map", "lab=nowhere")
        assert "host 'host-2' has no network 'nowhere' (--network-map lab=nowhere)" in line
        assert env.vm("guarded", "host-2")["nics"][0]["network"] == "prod"  # the map stayed
        # 'none' clears the map: the replica's NIC is on 'lab' there again; then back.
        cli("replication", "set", "guarded", "--network-map", "none")
        assert env.vm("guarded", "host-2")["nics"][0]["network"] == "lab"
        cli("replication", "set", "guarded", "--network-map", "lab=prod")
        assert env.vm("guarded", "host-2")["nics"][0]["network"] == "prod"
        wait_for(lambda: cli.json("replication", "status", "guarded"),
                 lambda s: s["state"] == "replicating")  # fmt: skip
        cli("replication", "sync", "guarded")

        # A test failover has no NIC unless asked ...
        cli("failover", "test", "guarded")
        drill = env.vm("guarded-test", "host-2")
        assert drill["nics"] == []
        text = env.wait_console("guarded-test", lambda t: UP.search(t) is not None,
                                host="host-2", timeout=180)  # fmt: skip
        assert "ferry-guest net" not in text
        cli("failover", "stop-test", "guarded")
        line = cli.fails("failover", "test", "guarded", "--test-network", "nowhere")
        assert "no network named 'nowhere' on host 'host-2'" in line
        # ... and with --test-network its NIC is there, with a MAC of its own,
        # and answers on the address that MAC gives it.
        cli("failover", "test", "guarded", "--test-network", "lab")
        (test_nic,) = env.vm("guarded-test", "host-2")["nics"]
        assert test_nic["network"] == "lab" and test_nic["mac"] != nic["mac"]
        assert test_nic["ip"] != nic["ip"]
        env.wait_console("guarded-test", lambda t: f"ferry-guest net eth0 {test_nic['mac']}" in t,
                         host="host-2", timeout=180)  # fmt: skip
        with echo_peer(env, "guarded-test", "host-2") as peer:
            report = peer.stop()
        assert report["error"] is None and report["received"] == report["sent"] > 0, report
        cli("failover", "stop-test", "guarded")

        # Planned failover: the VM starts on host-2 with the same MAC, on 'prod'.
        cli("failover", "planned", "guarded")
        there = env.vm("guarded", "host-2")
        assert there["state"] == "running"
        (after,) = there["nics"]
        assert after["network"] == "prod" and after["mac"] == nic["mac"]
        assert after["ip"] == nic["ip"]
        env.wait_console("guarded", lambda t: f"ferry-guest net eth0 {nic['mac']}" in t,
                         host="host-2", timeout=180)  # fmt: skip
        with echo_peer(env, "guarded", "host-2") as peer:
            report = peer.stop()
        assert report["error"] is None and report["received"] == report["sent"] > 0, report
        # Replication flows back; the replica on host-1 is on 'lab' again (the map back).
        back = wait_for(lambda: env.vm("guarded", "host-1"), lambda v: v["state"] == "replica")
        assert back["nics"][0]["network"] == "lab" and back["nics"][0]["mac"] == nic["mac"]

        # Unplanned failover back: the VM dies on host-2 (its primary now) and
        # host-1 starts it from its replica: the NIC on 'lab' (the map back),
        # the same MAC, the same address, and it answers.
        status = wait_for(lambda: cli.json("replication", "status", "guarded"),
                          lambda s: s["state"] == "replicating")  # fmt: skip
        assert status["state"] == "replicating", status
        cli("replication", "sync", "guarded")
        cli("vm", "kill", "guarded", "--host", "host-2")  # the primary's VM is down
        cli("failover", "start", "guarded", "--host", "host-1")
        home = env.vm("guarded", "host-1")
        assert home["state"] == "running"
        (again,) = home["nics"]
        assert again["network"] == "lab" and again["mac"] == nic["mac"]
        assert again["ip"] == nic["ip"]
        with echo_peer(env, "guarded", "host-1") as peer:
            report = peer.stop()
        assert report["error"] is None and report["received"] == report["sent"] > 0, report
    finally:
        for host in ("host-1", "host-2"):
            cli("replication", "remove", "guarded", "--host", host, check=False)
        for name in ("guarded-test", "guarded"):
            for host in ("host-1", "host-2"):
                cli("vm", "delete", name, "--force", "--host", host, check=False)
