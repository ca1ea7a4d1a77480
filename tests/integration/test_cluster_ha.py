"""High availability under faults, with real agents, a real etcd and real QEMU guests.

The invariant: at no moment do two QEMUs write one clustered disk. In the lab
every node shares one kernel, so QEMU's image lock would refuse a second
writer and hide a fencing bug; these tests therefore check the *order* of
events (the old QEMU gone, by a poll of /proc every few milliseconds, before
the new one started, by its start time in /proc) and the guest's records on
the shared disk (one unbroken sequence, nothing torn).

The faults: a node lost whole (its agent, QEMUs and guard SIGKILLed); a node
cut off from etcd by a TCP proxy while its agent lives (it fences itself
within the TTL, the VM restarts once elsewhere, and the old node does not
start it again when the path comes back); an agent SIGKILLed with its QEMU
alive (the fence guard kills the QEMU before the restart elsewhere); an etcd
restart (nothing restarts).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from ferry.adapters import qemu
from ferry.adapters.etcd_server import EtcdServer
from ferry.core.cluster.timing import ClusterTimings
from ferry.host.cluster.guard import GuardPaths, read_log
from ferry.host.config import load_host_config
from tests.conftest import UP, LabEnv, qemu_pids_for, seqs
from tests.integration.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

CLUSTER = "c1"
CUT_HOST = 3  # the node whose etcd traffic goes through the proxy


# -- what the tests observe --------------------------------------------------------


def _boot_wall() -> float:
    """The wall-clock time of boot, to 10 ms (``btime`` in /proc/stat is whole seconds)."""
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - uptime


def start_time(pid: int) -> float:
    """When process ``pid`` started, wall clock (from /proc/PID/stat's starttime)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    ticks = int(stat.rpartition(")")[2].split()[19])  # field 22
    return _boot_wall() + ticks / os.sysconf("SC_CLK_TCK")


class DeathWatch:
    """Polls one QEMU every 5 ms in a thread; ``died_at`` is when it was first seen gone."""

    def __init__(self, pid: int, uuid: str) -> None:
        self.pid, self.uuid = pid, uuid
        self.died_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not qemu.process_matches(self.pid, self.uuid):
                self.died_at = time.time()
                return
            time.sleep(0.005)

    def wait(self, timeout: float) -> float:
        self._thread.join(timeout)
        assert self.died_at is not None, f"QEMU {self.pid} still runs after {timeout:.0f}s"
        return self.died_at

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Ha:
    env: LabEnv
    timings: ClusterTimings
    etcd: EtcdServer
    proxy: TcpProxy
    vms: list[str] = field(default_factory=list)

    @property
    def cli(self) -> Any:
        return self.env.cli

    def create(self, name: str, host: int) -> dict[str, Any]:
        self.cli("vm", "create", name, "--cluster", CLUSTER, "--volume", "csv1", "--host",
                 f"host-{host}", "--guest", "test", "--memory", "128M", "--disk", "32M",
                 "--start")  # fmt: skip
        self.vms.append(name)
        self.env.wait_console(name, lambda t: len(seqs(t)) >= 3, timeout=90)
        return self.env.vm(name)

    def wait_elsewhere(self, name: str, old_host: str, timeout: float) -> dict[str, Any]:
        """Poll the other nodes until one runs the VM with a live QEMU.

        (The old node may still list it, crashed, while it cannot reach etcd.)
        """
        others = [f"host-{i}" for i in (1, 2, 3) if f"host-{i}" != old_host]
        deadline = time.monotonic() + timeout
        seen: dict[str, Any] = {}
        while time.monotonic() < deadline:
            for host in others:
                result = self.cli("vm", "show", name, "--host", host, "--json", check=False)
                if result.returncode != 0:
                    seen[host] = result.stderr.strip()
                    continue
                shown = json.loads(result.stdout)
                seen[host] = shown.get("state")
                if shown["state"] == "running" and shown.get("pid"):
                    return dict(shown)
            time.sleep(0.2)
        raise AssertionError(f"VM {name} did not come up away from {old_host}: {seen}")

    def where(self, name: str, host: str | None = None) -> dict[str, Any]:
        return self.env.vm(name, host)

    def events(self, since: float, kind: str | None = None) -> list[dict[str, Any]]:
        found = [e for e in self.cli.json("cluster", "events", CLUSTER) if e["at"] >= since]
        return [e for e in found if kind is None or e["kind"] == kind]

    def check_records(self, name: str, host: str) -> dict[str, Any]:
        """Kill the VM and read its disk: one unbroken sequence 1..N, nothing torn."""
        vm = self.where(name, host)
        self.cli("vm", "kill", name, "--host", host)
        records: dict[str, Any] = self.cli.json("guest", "records", vm["disks"][0]["path"])
        assert records["corrupt"] == 0, records
        # Each seq has one slot (the disk does not wrap in these runs): as many
        # valid records as the last seq means none is missing or out of place.
        assert records["count"] == records["last_seq"], records
        return records


def host_toml(env: LabEnv, index: int) -> dict[str, Any]:
    return tomllib.loads(env.lab.host(index).config_path.read_text())


def cluster_file(env: LabEnv, index: int) -> Path:
    return env.lab.host(index).data_dir / "cluster.json"


def guard_paths(env: LabEnv, index: int) -> GuardPaths:
    config = load_host_config(env.lab.host(index).config_path)
    return GuardPaths.of_host(config.name, config.data_dir, config.runtime_dir)


@pytest.fixture(scope="module")
def ha(cluster_lab_env: LabEnv) -> Iterator[Ha]:
    """The cluster lab with host-3's path to etcd through a proxy the tests can cut."""
    env = cluster_lab_env
    ttl = int(host_toml(env, 1).get("cluster_lease_ttl", 10))
    timings = ClusterTimings.from_ttl(ttl)
    etcd_urls = json.loads(cluster_file(env, 1).read_text())["etcd"]
    target = urlsplit(etcd_urls[0])
    assert target.hostname == "127.0.0.1" and target.port is not None
    etcd = env.lab.etcd
    assert etcd.pid() is not None, "the lab's etcd does not run"
    proxy = TcpProxy(("127.0.0.1", target.port)).start()
    try:
        # host-3 reconnects through the proxy (same CA, same IP: TLS still holds).
        path = cluster_file(env, CUT_HOST)
        saved = json.loads(path.read_text())
        saved["etcd"] = [f"https://{proxy.url_host}"]
        env.kill_agent(CUT_HOST)  # no VM runs there yet
        path.write_text(json.dumps(saved))
        env.restart_agent(CUT_HOST)  # started again by the lab, with the proxy's URL
        wait_node_state(env, f"host-{CUT_HOST}", "up", timeout=30)
        assert proxy.accepted > 0, "host-3 does not talk to etcd through the proxy"
        yield Ha(env, timings, etcd, proxy)
    finally:
        proxy.stop()


def node_states(env: LabEnv) -> dict[str, str]:
    shown = env.cli.json("cluster", "show", CLUSTER)
    return {n["name"]: n["state"] for n in shown["nodes"]}


def wait_node_state(env: LabEnv, node: str, state: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = node_states(env)
        if states.get(node) == state:
            return
        time.sleep(0.3)
    raise AssertionError(f"node {node} never became {state}: {states}")


def wait_all_up(ha: Ha, timeout: float = 60) -> None:
    for index in (1, 2, 3):
        wait_node_state(ha.env, f"host-{index}", "up", timeout)


def old_run(ha: Ha, index: int, uuid: str) -> list[int]:
    """The seqs the VM's run on host-``index`` printed, read from its serial log file.

    Read after that QEMU died (its node's agent may be dead too).
    """
    log = ha.env.lab.host(index).data_dir / "vms" / uuid / "serial.log"
    return seqs(log.read_text(errors="replace").replace("\r\n", "\n"))


def assert_continued(ha: Ha, name: str, host: str, before: list[int]) -> int:
    """The new boot (on ``host``) found the old run's records and went on from there."""
    text = ha.env.wait_console(name, lambda t: bool(UP.search(t)) and len(seqs(t)) >= 2,
                               timeout=90, host=host)  # fmt: skip
    (up,) = UP.findall(text)
    # The old run printed a seq only once it was durable; it may have written
    # one more it did not get to print.
    assert max(before) <= int(up) <= max(before) + 1, (up, before[-3:])
    assert seqs(text)[0] == int(up) + 1
    return int(up)


def stay_away(ha: Ha, uuid: str, pid: int, seconds: float) -> None:
    """For ``seconds``, exactly one QEMU of the VM runs: ``pid`` (the new one)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert qemu_pids_for(uuid) == [pid], "a second QEMU of the VM started"
        time.sleep(0.2)


# -- the faults --------------------------------------------------------------------


def test_node_loss_restarts_the_vm_on_another_node_with_its_records(ha: Ha) -> None:
    wait_all_up(ha)
    vm = ha.create("lossy", host=2)
    guard = guard_paths(ha.env, 2)
    t0 = time.time()
    # The whole node goes: agent, QEMU and guard, all at once.
    agent_pid = ha.env.lab.host(2).pid()
    assert agent_pid is not None
    guard_pid = guard.pid()
    for pid in (agent_pid, vm["pid"], guard_pid):
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
    watch = DeathWatch(vm["pid"], vm["uuid"])
    died = watch.wait(5)
    before = old_run(ha, 2, vm["uuid"])
    moved = ha.wait_elsewhere("lossy", "host-2", timeout=ha.timings.ttl_s + 60)
    started = start_time(moved["pid"])
    print(
        f"node loss: old QEMU gone {died - t0:.2f}s after the kill, new one started "
        f"{started - t0:.2f}s after it on {moved['host']}"
    )
    assert started > died
    # No start came too early and failed on the way (image locks are off here).
    assert ha.events(t0, "vm-start-failed") == []
    # etcd expires the lease no sooner than TTL after the last renewal (at most
    # one renewal interval before the kill): the restart cannot come earlier.
    assert started - t0 >= ha.timings.ttl_s - ha.timings.renew_interval_s
    assert_continued(ha, "lossy", moved["host"], before)
    restarts = ha.events(t0, "vm-restart")
    assert [(e["vm"], e["node"]) for e in restarts] == [("lossy", moved["host"])]
    # The node comes back: it does not start the VM it no longer owns.
    ha.env.restart_agent(2)
    stay_away(ha, vm["uuid"], moved["pid"], 3 * ha.timings.ttl_s / 2)
    ha.check_records("lossy", moved["host"])


def test_a_node_cut_from_etcd_fences_itself_and_the_vm_restarts_once_elsewhere(ha: Ha) -> None:
    wait_all_up(ha)
    vm = ha.create("cutoff", host=CUT_HOST)
    watch = DeathWatch(vm["pid"], vm["uuid"])
    t0 = time.time()
    ha.proxy.cut()
    died = watch.wait(ha.timings.ttl_s + 5)
    before = old_run(ha, CUT_HOST, vm["uuid"])
    # Fenced before etcd could expire the lease: the last renewal was sent at most
    # a renewal interval before t0, so the lease lasts at least TTL - that.
    lease_floor = ha.timings.ttl_s - ha.timings.renew_interval_s
    assert died - t0 < lease_floor, f"the cut node's QEMU lived {died - t0:.2f}s"
    assert ha.env.lab.host(CUT_HOST).pid() is not None, "the cut node's agent died"
    moved = ha.wait_elsewhere("cutoff", f"host-{CUT_HOST}", timeout=60)
    print(
        f"cut: old QEMU gone {died - t0:.2f}s after the cut (TTL {ha.timings.ttl_s}s), "
        f"new one started {start_time(moved['pid']) - t0:.2f}s after it on {moved['host']}"
    )
    assert start_time(moved["pid"]) > died
    assert ha.events(t0, "vm-start-failed") == []
    assert_continued(ha, "cutoff", moved["host"], before)
    ha.proxy.restore()
    # The old node rejoins with a new lease (up again, the fence on record) and
    # leaves the VM alone.
    wait_node_state(ha.env, f"host-{CUT_HOST}", "up", timeout=30)
    stay_away(ha, vm["uuid"], moved["pid"], 3 * ha.timings.ttl_s / 2)
    fenced = ha.events(t0, "node-fenced")
    assert [e["node"] for e in fenced] == [f"host-{CUT_HOST}"]
    restarts = ha.events(t0, "vm-restart")
    assert [(e["vm"], e["node"]) for e in restarts] == [("cutoff", moved["host"])]
    ha.check_records("cutoff", moved["host"])


def test_an_agent_killed_with_its_qemu_alive_is_fenced_by_its_guard(ha: Ha) -> None:
    wait_all_up(ha)
    vm = ha.create("orphan", host=1)
    watch = DeathWatch(vm["pid"], vm["uuid"])
    t0 = time.time()
    ha.env.kill_agent(1)
    died = watch.wait(ha.timings.ttl_s + 5)
    before = old_run(ha, 1, vm["uuid"])
    # Killed by the guard before etcd could expire the agent's lease (see the cut test).
    assert died - t0 < ha.timings.ttl_s - ha.timings.renew_interval_s
    moved = ha.wait_elsewhere("orphan", "host-1", timeout=60)
    started = start_time(moved["pid"])
    print(
        f"agent killed: QEMU gone {died - t0:.2f}s after (guard limit "
        f"{ha.timings.guard_limit_s:g}s), new one started {started - t0:.2f}s after"
    )
    assert started > died
    # No start came too early and failed on the way (image locks are off here).
    assert ha.events(t0, "vm-start-failed") == []
    # The guard says it killed that QEMU, and when: before the new one started.
    log = read_log(guard_paths(ha.env, 1).log)
    killed = [r for r in log if r["event"] == "killed" and r["vm"] == vm["uuid"]]
    gone = [r for r in log if r["event"] == "gone" and r["vm"] == vm["uuid"]]
    assert len(killed) == 1 and len(gone) == 1, log[-6:]
    assert t0 < killed[0]["at"] <= gone[0]["at"] < started
    assert_continued(ha, "orphan", moved["host"], before)
    ha.env.restart_agent(1)
    stay_away(ha, vm["uuid"], moved["pid"], 3 * ha.timings.ttl_s / 2)
    ha.check_records("orphan", moved["host"])


def test_an_etcd_restart_restarts_nothing(ha: Ha) -> None:
    """etcd restarts: a node cannot tell that from being cut off itself, so what
    its TTL bridges is kept running untouched; past that it fences, and then the
    VM must come back exactly once, its records whole (never two writers)."""
    wait_all_up(ha)
    vm = ha.create("steady", host=2)
    pid = vm["pid"]
    watch = DeathWatch(pid, vm["uuid"])
    t0 = time.time()
    ha.etcd.stop()
    ha.etcd.start()
    outage = time.time() - t0
    t = ha.timings
    # What this TTL bridges for sure: the last beat may be a renewal interval
    # old when etcd goes, and the first retry after it is back a retry away.
    bridged = t.guard_limit_s - t.renew_interval_s - t.retry_interval_s
    print(f"etcd restart: {outage:.2f}s without etcd (bridged for sure: {bridged:.2f}s)")
    # A needless fence would show within the self-fence deadline, a restart
    # elsewhere within the TTL and a leader poll.
    time.sleep(2 * t.ttl_s)
    watch.stop()
    died = watch.died_at
    if died is None:  # bridged (for sure below `bridged`, by luck of phase above it)
        assert qemu_pids_for(vm["uuid"]) == [pid], f"etcd was down {outage:.1f}s"
        assert ha.where("steady", "host-2")["pid"] == pid
        assert ha.events(t0, "vm-restart") == []
        # Above `bridged`, each node's luck of phase is its own: another node may have
        # fenced itself (seen at 2.15 s against 1.45 s, load ~6). host-2 did not: a node
        # that fences kills its QEMUs, and this one lives. Those that fenced rejoin.
        fenced = {e["node"] for e in ha.events(t0, "node-fenced")}
        assert "host-2" not in fenced, fenced
        if outage < bridged:
            assert not fenced, f"fenced after an outage of {outage:.2f}s that the TTL bridges"
        wait_all_up(ha)
        text = ha.env.console("steady", "host-2")
        assert len(UP.findall(text)) == 1, "the guest booted again"
        ha.check_records("steady", "host-2")
        return
    # The nodes fenced: only right when etcd was away longer than the TTL bridges
    # for sure (a loaded machine). Then the VM runs once, started after its old
    # QEMU died.
    assert outage >= bridged, f"fenced after an outage of {outage:.2f}s that the TTL bridges"
    print("etcd was away longer than the TTL bridges: checking the fenced outcome")
    deadline = time.monotonic() + 90
    while len(qemu_pids_for(vm["uuid"])) != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    (new_pid,) = qemu_pids_for(vm["uuid"])
    assert start_time(new_pid) > died
    assert len(ha.events(t0, "vm-restart")) <= 1
    stay_away(ha, vm["uuid"], new_pid, t.ttl_s)
    for index in (1, 2, 3):
        if ha.cli("vm", "show", "steady", "--host", f"host-{index}", "--json",
                  check=False).returncode == 0:  # fmt: skip
            shown = ha.where("steady", f"host-{index}")
            if shown.get("pid") == new_pid:
                ha.check_records("steady", f"host-{index}")
                break
    else:
        raise AssertionError("no node shows the running VM")
    # Every node that fenced is back up without an admin (they rejoined).
    wait_all_up(ha)
