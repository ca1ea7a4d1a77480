"""The ferry agent process: one per host.

Start-up order matters: lock the data dir (one agent per host), open the
catalog (refusing a newer schema), learn the accelerator, re-attach to every
running QEMU, and only then serve HTTPS, so the first answer is already true.
On SIGTERM/SIGINT it stops serving and lets go of its QEMUs, which keep
running.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
from pathlib import Path

from aiohttp import web

from ferry import __version__
from ferry.adapters import sd_notify
from ferry.adapters.catalog import Catalog
from ferry.adapters.etcd import open_store
from ferry.adapters.pki import server_ssl_context, thumbprint
from ferry.api.cluster import ClusterRoutes
from ferry.api.doctor import DoctorRoutes
from ferry.api.inventory import InventoryRoutes
from ferry.api.metrics import MetricsRoutes, serve_plain
from ferry.api.pki import PkiRoutes, open_connections
from ferry.api.replica_broker import ReplicaBrokerRoutes
from ferry.api.server import AgentApi
from ferry.core import vmstate
from ferry.core.cluster.roles import Priority
from ferry.core.cluster.timing import ClusterTimings
from ferry.errors import ConfigError
from ferry.host import facts
from ferry.host.adopt import ADOPT, AdoptionService
from ferry.host.certificates import HostCertificates
from ferry.host.cluster.copy_disks import DiskCopies
from ferry.host.cluster.crossing import ClusterCrossing, CrossingGuard
from ferry.host.cluster.fencing import NodeFencing
from ferry.host.cluster.guard import GuardPaths
from ferry.host.cluster.guard_client import FenceGuardClient
from ferry.host.cluster.ha import HaLeader
from ferry.host.cluster.maintenance import Maintenance
from ferry.host.cluster.membership import ClusterContext
from ferry.host.cluster.reconciler import Reconciler
from ferry.host.cluster.replication import ClusterReplication
from ferry.host.cluster.service import ClusterService, NodeIdentity
from ferry.host.cluster.switchover import OwnerHandover
from ferry.host.cluster.vms import ClusterVms
from ferry.host.cluster.volumes import VolumeService
from ferry.host.config import HostConfig, load_host_config
from ferry.host.doctor import HostDoctor
from ferry.host.exchange.service import EXPORT, IMPORT, ExchangeService
from ferry.host.failover.service import FailoverService
from ferry.host.inventory import InventoryService
from ferry.host.jobs import JobRegistry
from ferry.host.log_format import LogFormat, configure_logging
from ferry.host.memtrace import start_if_asked
from ferry.host.metrics.wiring import agent_metrics
from ferry.host.migration.service import INCOMING, MOVE, MigrationService
from ferry.host.replication.broker import ReplicaBroker
from ferry.host.replication.cycle import INITIAL_JOB, RESYNC_JOB
from ferry.host.replication.endpoints import ReplicationEndpoints
from ferry.host.replication.extension import ExtensionService
from ferry.host.replication.primary import ReplicationService
from ferry.host.replication.receiver import ReplicaStore
from ferry.host.replication.replica_move import ReplicaMover
from ferry.host.replication.server import ReplicaServer
from ferry.host.vms.service import VmService
from ferry.peer.client import PeerConnector
from ferry.peer.server import PeerServer

log = logging.getLogger(__name__)

LOCK_FILE = "agent.lock"
PID_FILE = "agent.pid"


def _lock_data_dir(data_dir: Path) -> int:
    """Hold an exclusive lock on the data dir for the agent's lifetime."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid_path = data_dir / PID_FILE
        holder = pid_path.read_text().strip() if pid_path.exists() else "?"
        raise ConfigError(
            f"another agent (pid {holder}) already runs on data dir {data_dir}"
        ) from None
    return fd


def _route_cancels(jobs: JobRegistry, migrations: MigrationService) -> None:
    """What ``ferry job cancel`` means for kinds whose services do not register it.

    (Failover registers its own kinds.) A move's phases are its states.
    """
    jobs.own_states(MOVE)
    jobs.own_states(INCOMING)
    jobs.on_cancel(MOVE, lambda job: migrations.cancel(job.id))
    jobs.refuse_cancel(INCOMING, lambda job: (
        "it is the incoming side of a move; cancel the move's job on host "
        f"{job.detail.get('source', 'the move came from')}"))  # fmt: skip
    for kind in (EXPORT, IMPORT, ADOPT):
        jobs.on_cancel(kind, jobs.cancel_task)
    for kind in (INITIAL_JOB, RESYNC_JOB):
        jobs.refuse_cancel(kind, lambda job: (
            f"it belongs to the replication of VM {job.vm_name!r}; 'ferry replication pause "
            f"{job.vm_name}' stops further cycles once the one under way ends"))  # fmt: skip


def _memory_free(vms: VmService) -> int:
    """What placement counts as free here: the host's memory less its live VMs'."""
    used = sum(r.spec.memory for r in vms.list() if vmstate.is_live(r.state))
    return max(0, vms.host_memory - used)


async def serve(config: HostConfig, *, ready: asyncio.Event | None = None) -> None:
    lock_fd = _lock_data_dir(config.data_dir)
    pidfile = config.data_dir / PID_FILE
    catalog = Catalog(config.data_dir)
    runner: web.AppRunner | None = None
    watchdog: asyncio.Task[None] | None = None
    metrics_runner: web.AppRunner | None = None
    vms: VmService | None = None
    migrations: MigrationService | None = None
    replication: ReplicationService | None = None
    extensions: ExtensionService | None = None
    reconciler: Reconciler | None = None
    cluster_replication: ClusterReplication | None = None
    clusters: ClusterService | None = None
    fencing: NodeFencing | None = None
    try:
        tls = server_ssl_context(config.tls_dir)
        # The one peer server every service registers its endpoints with.
        peer_server = PeerServer()
        # The one way this host's services reach other hosts (its certificate).
        peers = PeerConnector(config.tls_dir)
        qemu_version = await asyncio.to_thread(facts.qemu_version, config.qemu_binary)
        accelerator = await facts.resolve_accelerator(config)
        vms = VmService(
            config,
            catalog,
            accelerator=accelerator,
            host_memory=facts.host_memory(),
            host_cpus=facts.host_cpus(),
            cpu=await facts.probe_cpu_models(config, accelerator),
        )
        await vms.reattach_all()
        jobs = JobRegistry(catalog)
        migrations = MigrationService(vms, jobs, peers)
        await migrations.recover()
        migrations.register(peer_server)
        exchange = ExchangeService(vms, jobs)
        exchange.recover()
        adoption = AdoptionService(vms, jobs)  # vm import --libvirt / --ovf
        adoption.recover()
        store = ReplicaStore(config, catalog, ReplicaServer(catalog, host=config.name),
                             cpu=vms.cpu)  # fmt: skip
        await store.recover()
        replication = ReplicationService(vms, jobs, store, peers)
        replication.recover()  # copy jobs a kill left running are failed
        migrations.observer = replication
        address, port = config.address
        url = f"https://{address}:{port}"
        extensions = ExtensionService(store, jobs, replication.cycles, url, peers)
        failover = FailoverService(vms, jobs, store, replication, peers)
        failover.register(peer_server)
        _route_cancels(jobs, migrations)
        # The one holder of this host's cluster membership (None outside a cluster).
        cluster_context = ClusterContext()
        me = NodeIdentity(config.name, url, __version__, config.functional_level,
                          config.data_dir, config.tls_dir)  # fmt: skip
        # Fencing: the host's guard (it outlives this agent) and, per membership,
        # the LeaseKeeper that renews the lease and kills the clustered QEMUs.
        timings = ClusterTimings.from_ttl(config.cluster_lease_ttl)
        guard = GuardPaths.of_host(config.name, config.data_dir, config.runtime_dir)
        fencing = NodeFencing(FenceGuardClient(guard, limit_s=timings.guard_limit_s))
        clusters = ClusterService(me, timings=timings, open_store=open_store,
                                  context=cluster_context, memory_free=lambda: _memory_free(vms),
                                  leader_work=HaLeader, lease_keeper=fencing.keep)  # fmt: skip
        cluster_volumes = VolumeService(cluster_context, peers, node=config.name)
        cluster_volumes.register(peer_server)
        cluster_vms = ClusterVms(cluster_context, vms)
        cluster_vms.disk_copies = DiskCopies(cluster_context, vms, peers, node=config.name)
        cluster_vms.disk_copies.register(peer_server)  # copy-roles, copied storage
        fencing.protected = lambda: dict(cluster_vms.clustered_processes())
        cluster_vms.lease_ok = fencing.holds_lease  # no clustered start without the lease
        cluster_vms.protect = fencing.protect_now  # a started clustered QEMU is guarded at once
        cluster_context.listen(fencing.on_membership)
        reconciler = Reconciler(cluster_vms, migrations, jobs)
        cluster_context.listen(reconciler.on_membership)
        crossing = ClusterCrossing(cluster_vms, jobs)  # vm move --to-cluster
        crossing.hold_after_handover_s = config.hold_after_handover_s
        handover = OwnerHandover(cluster_vms, jobs)
        handover.hold_after_handover_s = config.hold_after_handover_s
        migrations.switch_guard = CrossingGuard(crossing, handover)
        # Replication of a clustered VM follows its owner (host/cluster/replication.py);
        # it listens before the membership reconnects, and resumes on the reconciler's start.
        cluster_replication = ClusterReplication(
            replication, cluster_context, url=url,
            thumbprint=thumbprint(config.tls_dir / "client-cert.pem"))  # fmt: skip
        cluster_replication.start()
        reconciler.on_started.append(cluster_replication.on_owned)
        reconciler.on_left.append(cluster_replication.on_left)
        exchange.cluster_vms = cluster_vms  # vm import --cluster
        maintenance = Maintenance(cluster_vms, migrations, jobs)
        # The planner's facts: inventory, dirty rates, the bandwidth probe (peer route too).
        inventory = InventoryService(vms, peers, memory_free=lambda: _memory_free(vms),
                                     url=url, cluster_vms=cluster_vms)  # fmt: skip
        inventory.register(peer_server)
        api = AgentApi(
            vms,
            migrations,
            exchange,
            replication,
            extensions,
            url=url,
            accelerator=accelerator,
            qemu_version=qemu_version,
            peer_server=peer_server,
            failover=failover,
            cluster_vms=cluster_vms,
            maintenance=maintenance,
            adoption=adoption,
        )
        await failover.recover()
        mover = ReplicaMover(store, replication.cycles.sender, failover, url, peers)
        # The replica broker: this node's cluster as a replica target (host/replication/broker.py).
        broker = ReplicaBroker(cluster_context, catalog, node=config.name, url=url)
        store.broker = broker
        broker.make_clustered = lambda cluster, name: cluster_vms.add(
            cluster, name, priority=Priority.MEDIUM)  # fmt: skip
        failover.unplanned.checks.append(broker.check_held)  # only the holder fails over
        failover.unplanned.started.append(broker.failed_over)  # into the cluster, HA there

        async def make_plain(cluster: str, name: str) -> None:
            found = catalog.find(name)
            if found is not None and found.uuid in cluster_vms.clustered:
                await cluster_vms.remove(cluster, name)

        broker.make_plain = make_plain
        failover.unplanned.cancelling.append(broker.leave_cluster)  # out of C before it stops
        failover.unplanned.cancelled.append(broker.replica_again)  # C's replica record again
        cluster_context.listen(broker.on_membership)  # a node back drops its stale copies
        broker.peers, broker.tls_dir = peers, config.tls_dir  # extensions from its replicas
        broker.resume = extensions.scheduler.spawn
        extensions.listeners.append(broker.extension_changed)
        extensions.reclaim = broker.reclaim_extension  # a claim at E lost at a take-over
        ReplicationEndpoints(store, mover=mover, adopt=replication.adopt,
                             broker=broker).register(peer_server)  # fmt: skip
        # GET /metrics: counters the services bump, gauges read at scrape time.
        metrics = agent_metrics(host=config.name, catalog=catalog, jobs=jobs,
                                replication=replication, fencing=fencing)  # fmt: skip
        certificates = HostCertificates.build(
            config, tls, peers, vms=vms, store=store, extensions=extensions, peer_server=peer_server
        )
        if cluster_replication is not None:  # the node's identity record follows a renewal
            certificates.on_renewed.append(cluster_replication.renewed)
        api.crossing = crossing
        app = api.app()
        PkiRoutes.install(app, certificates)  # renewal in place, the deny-list
        app.add_routes(MetricsRoutes(metrics.registry).routes())
        app.add_routes(ClusterRoutes(clusters, cluster_volumes).routes())
        app.add_routes(ReplicaBrokerRoutes(broker).routes())
        app.add_routes(InventoryRoutes(inventory).routes())
        doctor = HostDoctor(config, accelerator=accelerator, qemu_version=qemu_version,
                            networks=vms.networks, replica_server=store.server,
                            cluster=cluster_context, volumes=cluster_volumes)  # fmt: skip
        app.add_routes(DoctorRoutes(doctor).routes())
        await clusters.start()  # reconnects to its cluster (in the background if etcd is away)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        certificates.revocations.attach(open_connections(runner))  # a revocation cuts them
        site = web.TCPSite(runner, address, port, ssl_context=tls, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(f"cannot listen on {config.listen}: {exc.strerror}") from exc
        if config.metrics_address is not None:  # loopback only (host config)
            metrics_runner = await serve_plain(metrics.registry, *config.metrics_address)
        pidfile.write_text(f"{os.getpid()}\n")
        log.info("agent %s serving %s (accelerator %s, QEMU %s)", config.name, url,
                 accelerator, qemu_version)  # fmt: skip
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await replication.start()
        await extensions.start()
        if ready is not None:
            ready.set()
        # systemd (Type=notify): ready only now, when the port answers and services run.
        sd_notify.notify(READY="1", STATUS=f"serving {url}", MAINPID=str(os.getpid()))
        interval = sd_notify.watchdog_interval()
        if interval is not None:
            watchdog = asyncio.create_task(sd_notify.keep_watchdog(interval), name="watchdog")
        memtrace = start_if_asked(config.name)  # FERRY_TRACEMALLOC=DIR, soaks only
        await stop.wait()
        if memtrace is not None:
            memtrace.cancel()
        log.info("agent %s stopping; VMs keep running", config.name)
    finally:
        sd_notify.notify(STOPPING="1", STATUS="stopping; VMs keep running")
        if watchdog is not None:
            watchdog.cancel()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        if runner is not None:
            await runner.cleanup()
        if reconciler is not None:
            await reconciler.stop()
        if clusters is not None:
            await clusters.shutdown()
        if fencing is not None:
            await fencing.close()  # the guard stays armed: the QEMUs are still ours
        if extensions is not None:
            await extensions.shutdown()
        if cluster_replication is not None:
            await cluster_replication.shutdown()
        if replication is not None:
            await replication.shutdown()
        if migrations is not None:
            await migrations.shutdown()
        if vms is not None:
            await vms.detach_all()
        catalog.close()
        with contextlib.suppress(OSError):
            pidfile.unlink()
        os.close(lock_fd)


def run_agent(config_path: Path, log_format: LogFormat = "text") -> None:
    config = load_host_config(config_path)
    configure_logging(log_format, host=config.name)
    asyncio.run(serve(config))
