"""A local lab: several ferry hosts on loopback on this one machine.

Layout of a lab dir::

    ca/                    the lab's certificate authority
    admin/                 the admin client certificate the CLI uses
    images/                a dir every lab host accepts --image files from
    shared/                volume "shared" on every host: disks here move without copying
    hosts/host-N/host.toml the host's config (its port is chosen once, then kept)
    hosts/host-N/tls/      the host's certificate, usable by QEMU as is
    hosts/host-N/data/     its catalog, VMs, agent.pid
    hosts/host-N/agent.log
    etcd/                  the lab's one etcd member (TLS, loopback), once a cluster was asked for
    clusters/C/csv1/       volume "csv1" of cluster C, on every node of C

Clusters (``up(..., clusters={"c1": ["host-1", ...]})``): the first host
creates the cluster in the lab's etcd, the others join it, then the first adds
volume ``csv1``; hosts already in the cluster are left as they are.

The lab network: ``up`` makes network namespace ``ferry-lab-<key>`` (the key
derives from the lab dir) with one bridge ``fl<key>`` in it, address
``10.213.0.1/16``, and names it network ``lab`` on every lab host. The hosts'
taps of lab NICs move into that namespace onto the bridge, so every lab guest
is on one LAN that nothing outside the namespace reaches; ``exec`` runs a peer
there. ``down`` deletes the namespace (and every tap in it) and any tap of a
lab host left in the root namespace.

Bringing a lab up is idempotent: what exists is kept, agents that run are left
alone, the rest start. The same agent code runs here as on real hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from ferry.adapters import loopback, netdev, pki, qemu
from ferry.adapters.catalog import Catalog
from ferry.adapters.etcd_server import EtcdServer
from ferry.agent import PID_FILE
from ferry.client.agent_client import AgentClient
from ferry.client.settings import HostEntry, load_settings, save_settings
from ferry.core import vmstate
from ferry.core.network import LAB_BRIDGE_IP, TEST_GUEST_PREFIX, host_key, tap_prefix
from ferry.core.spec import check_name
from ferry.core.vmstate import VmOp
from ferry.errors import ConfigError, ConflictError, FerryError, InvalidInputError, NotFoundError
from ferry.host.cluster.guard import GuardPaths, stop_guard
from ferry.host.config import load_host_config
from ferry.host.vms.states import VmStates

AGENT_START_TIMEOUT_S = 60.0
AGENT_STOP_TIMEOUT_S = 15.0
MAX_LAB_HOSTS = 16
SHARED_VOLUME = "shared"
LAB_NETWORK = "lab"
LAB_NETNS_PREFIX = "ferry-lab-"
CLUSTER_VOLUME = "csv1"
CLUSTER_CALL_TIMEOUT_S = 60.0
MIN_LEASE_TTL_S, MAX_LEASE_TTL_S = 2, 300  # as host.toml's cluster_lease_ttl allows

Progress = Callable[[str], None]


@dataclass(frozen=True)
class LabHost:
    name: str
    dir: Path

    @property
    def config_path(self) -> Path:
        return self.dir / "host.toml"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def log_path(self) -> Path:
        return self.dir / "agent.log"

    def pid(self) -> int | None:
        """The pid of this host's running agent, if one runs."""
        pid = qemu.read_pidfile(self.data_dir / PID_FILE)
        if pid is None:
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        return pid if str(self.config_path).encode() in cmdline else None


class Lab:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.ca_dir = self.root / "ca"
        self.admin_dir = self.root / "admin"
        self.images_dir = self.root / "images"
        self.shared_dir = self.root / "shared"
        self.etcd = EtcdServer(self.root / "etcd", self.ca_dir)
        key = hashlib.sha256(str(self.root).encode()).hexdigest()[:8]
        # The lab network's namespace and bridge, named from the lab dir.
        self.netns = f"{LAB_NETNS_PREFIX}{key}"
        self.bridge = f"fl{key}"
        # Agents this object started, reaped by down(): in a long-lived process
        # (the test suite) an agent that ended stays a zombie child until then.
        self._agents: list[subprocess.Popen[bytes]] = []

    def hosts(self) -> list[LabHost]:
        hosts_dir = self.root / "hosts"
        if not hosts_dir.is_dir():
            return []
        found = [LabHost(p.name, p) for p in hosts_dir.iterdir() if (p / "host.toml").exists()]
        return sorted(found, key=lambda h: (len(h.name), h.name))

    def host(self, index: int) -> LabHost:
        name = f"host-{index}"
        return LabHost(name, self.root / "hosts" / name)

    # -- up ------------------------------------------------------------------

    def _prepare(self, count: int, progress: Progress) -> list[LabHost]:
        self.root.mkdir(parents=True, exist_ok=True)
        self.images_dir.mkdir(exist_ok=True)
        self.shared_dir.mkdir(exist_ok=True)
        if not (self.ca_dir / "ca-cert.pem").exists():
            progress("creating the lab's certificate authority")
            pki.create_ca(self.ca_dir, name="ferry-lab-ca")
        if not (self.admin_dir / "client-cert.pem").exists():
            pki.issue_admin_cert(self.ca_dir, self.admin_dir, "admin")
        hosts = [self.host(i) for i in range(1, count + 1)]
        for host in hosts:
            if host.config_path.exists():
                continue
            progress(f"creating {host.name}")
            host.dir.mkdir(parents=True, exist_ok=True)
            pki.issue_host_cert(self.ca_dir, host.dir / "tls", host.name, ips=["127.0.0.1"])
            config = {
                "name": host.name,
                "listen": f"127.0.0.1:{loopback.free_port()}",
                "data_dir": str(host.data_dir),
                "tls_dir": str(host.dir / "tls"),
                "accelerator": "tcg",  # nested KVM hangs guests; see DESIGN.md section 4
                "image_dirs": [str(self.images_dir)],
            }
            host.config_path.write_text(tomli_w.dumps(config))
        return hosts

    def _register(self, hosts: list[LabHost]) -> None:
        settings = load_settings()
        settings.admin_tls_dir = self.admin_dir
        settings.lab_dir = self.root
        for host in hosts:
            config = load_host_config(host.config_path)
            address, port = config.address
            settings.hosts[host.name] = HostEntry(
                url=f"https://{address}:{port}", server_name=host.name
            )
        save_settings(settings)

    def up(
        self,
        count: int,
        progress: Progress = lambda _: None,
        *,
        clusters: Mapping[str, Sequence[str]] | None = None,
        lease_ttl_s: int | None = None,
        host_settings: Mapping[str, int | bool] | None = None,
    ) -> list[LabHost]:
        """Hosts host-1..host-``count`` with running agents, and the ``clusters`` asked for.

        ``clusters``: cluster name -> its hosts (empty: all of them).
        ``lease_ttl_s``: written into each host.toml as ``cluster_lease_ttl``;
        a running agent whose value changed is restarted. ``host_settings``:
        more host.toml settings written the same way (tests:
        ``{"functional_level": 2}`` before the agents first start; fencing tests
        ``{"image_locking": False}``, since every lab host shares one kernel and
        a lock would refuse a second writer that separate machines would not).
        Bad input is refused before anything changes.
        """
        if not 1 <= count <= MAX_LAB_HOSTS:
            raise InvalidInputError(f"--hosts must be 1..{MAX_LAB_HOSTS}, not {count}")
        wanted = _check_clusters(count, clusters or {})
        if lease_ttl_s is not None and not MIN_LEASE_TTL_S <= lease_ttl_s <= MAX_LEASE_TTL_S:
            raise InvalidInputError(
                f"the lease TTL must be {MIN_LEASE_TTL_S}..{MAX_LEASE_TTL_S} s, not {lease_ttl_s}"
            )
        hosts = self._prepare(count, progress)
        changed = self._set_setting(hosts, "cluster_lease_ttl", lease_ttl_s)
        for key, value in (host_settings or {}).items():
            changed |= self._set_setting(hosts, key, value)
        self._register(hosts)
        progress(f"making the lab network (bridge {self.bridge} in namespace {self.netns})")
        for orphan in sweep_orphan_networks():
            progress(f"removed namespace {orphan} of a lab whose dir is gone")
        netdev.add_netns(self.netns)
        netdev.add_bridge(self.bridge, self.netns, f"{LAB_BRIDGE_IP}/{TEST_GUEST_PREFIX}")
        # The bridge names its lab, so a later sweep can tell an orphan (dir gone);
        # a dir too long for the alias is not named (never swept: a cut name lies).
        if len(str(self.root).encode()) <= netdev.MAX_ALIAS:
            netdev.set_alias(self.bridge, str(self.root), self.netns)
        # etcd first: agents that are cluster nodes reconnect to it as they start.
        if wanted or self.etcd.configured:
            progress(f"starting etcd at {self.etcd.url}")
            self.etcd.start()
        started = []
        for host in hosts:
            pid = host.pid()
            if pid is not None and host.name in changed:
                progress(f"restarting the agent of {host.name} (its host.toml changed)")
                loopback.terminate(pid, str(host.config_path).encode(), AGENT_STOP_TIMEOUT_S)
                pid = None
            if pid is None:
                progress(f"starting the agent of {host.name}")
                started.append((host, self._spawn(host)))
        for host, proc in started:
            try:
                asyncio.run(self._wait_ready(host, proc))
            except BaseException:
                # Not ready in time: end it, or it outlives the lab (its pid file
                # may not be written yet, so 'lab down' would not find it).
                marker = str(host.config_path).encode()
                loopback.terminate(proc.pid, marker, AGENT_STOP_TIMEOUT_S)
                proc.wait()
                raise
        asyncio.run(self._add_lab_network(hosts, progress))
        if wanted:
            asyncio.run(self._make_clusters(wanted, progress))
        return hosts

    def _set_setting(self, hosts: list[LabHost], key: str, value: int | bool | None) -> set[str]:
        """Write ``key = value`` into each host.toml; the hosts whose value changed."""
        if value is None:
            return set()
        changed = set()
        for host in hosts:
            settings = tomllib.loads(host.config_path.read_text())
            if settings.get(key) == value:
                continue
            if getattr(load_host_config(host.config_path), key) != value:
                changed.add(host.name)
            settings[key] = value
            host.config_path.write_text(tomli_w.dumps(settings))
        return changed

    def cluster_volume_dir(self, cluster: str) -> Path:
        return self.root / "clusters" / cluster / CLUSTER_VOLUME

    async def _make_clusters(self, wanted: dict[str, list[str]], progress: Progress) -> None:
        """Create or join each cluster through its hosts' agents, then add its volume."""
        tls = pki.client_ssl_context(self.admin_dir)
        async with contextlib.AsyncExitStack() as stack:
            clients: dict[str, AgentClient] = {}
            for name in sorted({h for members in wanted.values() for h in members}):
                address, port = load_host_config(self.host_named(name).config_path).address
                client = AgentClient(name, f"https://{address}:{port}", tls,
                                     timeout=CLUSTER_CALL_TIMEOUT_S)  # fmt: skip
                clients[name] = await stack.enter_async_context(client)
            member_of = {name: await c.get("/v1/cluster") for name, c in clients.items()}
            for cluster, members in wanted.items():
                for name in members:
                    current = member_of[name]
                    if current is not None and current["name"] != cluster:
                        raise ConflictError(
                            f"{name} is a node of cluster {current['name']}, not {cluster}; "
                            f"leave it first: ferry cluster leave {current['name']} --host {name}"
                        )
            body_of = {"etcd": [self.etcd.url], "etcd_tls": None}  # the hosts' own certificates
            for cluster, members in wanted.items():
                body = {"name": cluster, **body_of}
                joined = [n for n in members if member_of[n] is not None]
                for name in members:
                    if name in joined:
                        continue
                    if not joined:
                        progress(f"creating cluster {cluster} on {name}")
                        try:
                            await clients[name].post("/v1/cluster/create", body)
                        except ConflictError:  # in etcd from an earlier lab: join it
                            await clients[name].post("/v1/cluster/join", body)
                    else:
                        progress(f"joining {name} to cluster {cluster}")
                        await clients[name].post("/v1/cluster/join", body)
                    joined.append(name)
                first = clients[members[0]]
                view = await first.get(f"/v1/clusters/{cluster}")
                if CLUSTER_VOLUME not in [v["name"] for v in view.get("volumes", [])]:
                    path = self.cluster_volume_dir(cluster)
                    path.mkdir(parents=True, exist_ok=True)
                    progress(f"adding volume {CLUSTER_VOLUME} to cluster {cluster}")
                    volume = {"name": CLUSTER_VOLUME, "path": str(path)}
                    await first.post(f"/v1/clusters/{cluster}/volumes", volume)

    async def _add_lab_network(self, hosts: list[LabHost], progress: Progress) -> None:
        """Network ``lab`` (the lab's bridge in its namespace) on every host that lacks it."""
        tls = pki.client_ssl_context(self.admin_dir)
        for host in hosts:
            address, port = load_host_config(host.config_path).address
            async with AgentClient(host.name, f"https://{address}:{port}", tls,
                                   timeout=CLUSTER_CALL_TIMEOUT_S) as client:  # fmt: skip
                names = [n["name"] for n in await client.get("/v1/networks")]
                if LAB_NETWORK not in names:
                    progress(f"adding network {LAB_NETWORK} to {host.name}")
                    body = {"name": LAB_NETWORK, "bridge": self.bridge, "netns": self.netns}
                    await client.post("/v1/networks", body)

    def exec(self, argv: Sequence[str]) -> int:
        """Run ``argv`` inside the lab network's namespace; its exit status."""
        if not argv:
            raise InvalidInputError("say what to run: ferry lab exec -- CMD [ARG...]")
        if not netdev.netns_exists(self.netns):
            raise NotFoundError(
                f"the lab at {self.root} has no network namespace {self.netns}: run ferry lab up"
            )
        try:
            return subprocess.run(netdev.exec_argv(self.netns, list(argv)), check=False).returncode
        except OSError as exc:
            raise InvalidInputError(f"cannot run {argv[0]} in {self.netns}: {exc}") from exc

    def host_named(self, name: str) -> LabHost:
        return LabHost(name, self.root / "hosts" / name)

    def _spawn(self, host: LabHost) -> subprocess.Popen[bytes]:
        with host.log_path.open("ab") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ferry", "agent", "--config", str(host.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # survives the CLI; lab down ends it by pid
            )
        self._agents.append(proc)
        return proc

    async def _wait_ready(self, host: LabHost, proc: subprocess.Popen[bytes]) -> None:
        config = load_host_config(host.config_path)
        address, port = config.address
        tls = pki.client_ssl_context(self.admin_dir)
        deadline = time.monotonic() + AGENT_START_TIMEOUT_S
        async with AgentClient(host.name, f"https://{address}:{port}", tls, timeout=5) as client:
            while True:
                if proc.poll() is not None:
                    raise ConfigError(
                        f"the agent of {host.name} exited at start: "
                        f"{loopback.last_line(host.log_path)} "
                        f"(log: {host.log_path})"
                    )
                with contextlib.suppress(FerryError):
                    await client.get("/v1/host")
                    volumes = await client.get("/v1/volumes")
                    if SHARED_VOLUME not in volumes:
                        volume = {"name": SHARED_VOLUME, "path": str(self.shared_dir)}
                        await client.post("/v1/volumes", volume)
                    return
                if time.monotonic() > deadline:
                    raise ConfigError(
                        f"the agent of {host.name} did not answer within "
                        f"{AGENT_START_TIMEOUT_S:.0f}s (log: {host.log_path})"
                    )
                await asyncio.sleep(0.2)

    # -- down ----------------------------------------------------------------

    def down(self, progress: Progress = lambda _: None) -> None:
        for host in self.hosts():
            pid = host.pid()
            if pid is not None:
                with contextlib.suppress(FerryError):
                    asyncio.run(self._kill_vms(host, progress))
                progress(f"stopping the agent of {host.name} (pid {pid})")
                loopback.terminate(pid, str(host.config_path).encode(), AGENT_STOP_TIMEOUT_S)
            # An agent leaves QEMUs running by design; end any left by their pidfiles.
            for pidfile in host.data_dir.glob("vms/*/qemu.pid"):
                uuid = pidfile.parent.name
                qemu_pid = qemu.find_process(pidfile, uuid)
                if qemu_pid is None:
                    continue
                progress(f"killing QEMU pid {qemu_pid} on {host.name}")
                asyncio.run(qemu.kill_process(qemu_pid, uuid))
                catalog = Catalog(host.data_dir)
                try:
                    record = catalog.find(uuid)
                    if record is not None and vmstate.allowed(record.state, VmOp.KILL):
                        VmStates(catalog).apply(record, VmOp.KILL)
                finally:
                    catalog.close()
            # A cluster node's fence guard outlives its agent by design; end it by pid.
            config = load_host_config(host.config_path)
            # Taps go with their QEMUs; one left in the root namespace goes now.
            prefix = tap_prefix(host_key(str(config.data_dir.resolve())))
            for tap in netdev.delete_matching(prefix):
                progress(f"removed tap {tap} of {host.name}")
            guard = GuardPaths.of_host(config.name, config.data_dir, config.runtime_dir)
            if stop_guard(guard):
                progress(f"stopped the fence guard of {host.name}")
        for proc in self._agents:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=AGENT_STOP_TIMEOUT_S)
        self._agents.clear()
        if netdev.delete_netns(self.netns):
            progress(f"removed the lab network (namespace {self.netns})")
        for orphan in sweep_orphan_networks():
            progress(f"removed namespace {orphan} of a lab whose dir is gone")
        # Last: a node's agent stopping may still write to etcd (its leave, its alive key).
        etcd_pid = self.etcd.pid()
        if etcd_pid is not None:
            progress(f"stopping etcd (pid {etcd_pid})")
        self.etcd.stop()

    # -- crash ---------------------------------------------------------------

    def crash(self, name: str) -> list[str]:
        """Power loss of lab host ``name``: SIGKILL its agent, fence guard and QEMUs.

        Nothing is asked to stop; the rest of the lab sees what a real host's
        failure looks like (a cluster's leader restarts its VMs elsewhere once
        its lease expires). ``ferry lab up`` brings its agent back. Every pid
        is checked (agent by config path, guard by socket, QEMU by uuid) before
        it is killed. Returns what was killed, one line each.
        """
        host = self.host_named(name)
        if not host.config_path.exists():
            known = ", ".join(h.name for h in self.hosts()) or "none"
            raise NotFoundError(f"the lab at {self.root} has no host {name!r} (hosts: {known})")
        killed: list[str] = []
        pid = host.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.append(f"agent pid {pid}")
        config = load_host_config(host.config_path)
        guard = GuardPaths.of_host(config.name, config.data_dir, config.runtime_dir)
        guard_pid = guard.pid()
        if guard_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(guard_pid, signal.SIGKILL)
            killed.append(f"fence guard pid {guard_pid}")
        for pidfile in host.data_dir.glob("vms/*/qemu.pid"):
            uuid = pidfile.parent.name
            qemu_pid = qemu.find_process(pidfile, uuid)
            if qemu_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(qemu_pid, signal.SIGKILL)
                killed.append(f"QEMU pid {qemu_pid} (VM {uuid})")
        for proc in self._agents:
            if proc.pid == pid:
                proc.wait(timeout=AGENT_STOP_TIMEOUT_S)
        return killed

    async def _kill_vms(self, host: LabHost, progress: Progress) -> None:
        config = load_host_config(host.config_path)
        address, port = config.address
        tls = pki.client_ssl_context(self.admin_dir)
        async with AgentClient(host.name, f"https://{address}:{port}", tls, timeout=30) as client:
            for vm in await client.get("/v1/vms"):
                if vm["state"] not in ("off", "crashed"):
                    progress(f"killing VM {vm['name']} on {host.name}")
                    await client.post(f"/v1/vms/{vm['name']}/kill")


def sweep_orphan_networks() -> list[str]:
    """Delete lab network namespaces whose lab dir no longer exists (a lab that
    was never brought down: its test run died, its tmp dir was removed).

    A lab's bridge carries its lab dir as its alias; a namespace without that
    mark, or whose dir still exists, is left alone (another lab, perhaps of
    another user of this machine, still has it).
    """
    gone = []
    for netns in netdev.namespaces(LAB_NETNS_PREFIX):
        key = netns.removeprefix(LAB_NETNS_PREFIX)
        with contextlib.suppress(FerryError):
            root = netdev.alias_of(f"fl{key}", netns)
            orphan = root is not None and Path(root).is_absolute() and not Path(root).exists()
            if orphan and netdev.delete_netns(netns):
                gone.append(netns)
    return gone


def _check_clusters(count: int, clusters: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """``clusters`` with every name checked, empty lists made all hosts; one host, one cluster."""
    every = [f"host-{i}" for i in range(1, count + 1)]
    wanted: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for cluster, members in clusters.items():
        check_name(cluster, what="cluster name")
        names = list(dict.fromkeys(members)) or every
        for name in names:
            if name not in every:
                raise InvalidInputError(
                    f"--cluster {cluster}: no lab host {name!r} (this lab: host-1..host-{count})"
                )
            if name in seen:
                raise InvalidInputError(
                    f"{name} cannot be in clusters {seen[name]} and {cluster}: "
                    "a host is in one cluster at a time"
                )
            seen[name] = cluster
        wanted[cluster] = names
    return wanted
