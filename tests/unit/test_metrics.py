"""The agent's Prometheus metrics without QEMU: the scrape-time collector, the event
counters, the host config's metrics_listen rule, and the Grafana dashboard.

Two hosts' catalogs are real (a primary with VM ``web`` replicating to a
replica host that holds its chain), jobs go through a real JobRegistry, the
lease keeper runs on the in-memory store with a fake clock. Every output is
parsed as Prometheus text and checked by ``promtool check metrics``.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ferry.adapters.catalog import Catalog
from ferry.core.cluster.nodes import MemberRecord
from ferry.core.cluster.records import ClusterMeta
from ferry.core.cluster.timing import ClusterTimings
from ferry.core.relationship import Relationship, Role
from ferry.core.replication import CycleKind, CycleRecord, PointInfo, ReplicationState
from ferry.core.spec import DiskSpec, VmSpec
from ferry.core.tasks import cancel_and_wait
from ferry.core.vmstate import VmState
from ferry.errors import ConfigError
from ferry.host.cluster.fencing import LeaseKeeper
from ferry.host.cluster.membership import Membership
from ferry.host.config import HostConfig, load_host_config
from ferry.host.jobs import JobRegistry
from ferry.host.metrics.collector import LeaseView, StateCollector
from ferry.host.metrics.recorder import MetricsRecorder
from ferry.host.replication.receiver import ReplicaStore
from ferry.host.replication.server import ReplicaServer
from ferry.testing.clock import FakeClock
from ferry.testing.store import MemoryStore
from ferry.testing.vms import FakeVms

UUID = "d1d1d1d1-0000-4000-8000-000000000001"
OFF_UUID = "d1d1d1d1-0000-4000-8000-000000000002"
DASHBOARD = Path(__file__).parents[2] / "docs" / "grafana" / "ferry-dashboard.json"
S = ReplicationState


def _spec(uuid: str = UUID, name: str = "web") -> VmSpec:
    disk = DiskSpec(path=f"/srv/{uuid}/disk0.qcow2", size=1 << 20, format="qcow2")
    return VmSpec(uuid=uuid, name=name, config_version=1, memory=1 << 27, disks=(disk,))


def _rel(role: Role, **update: object) -> Relationship:
    base = Relationship(vm_uuid=UUID, vm_name="web", role=role, primary="host-1",
                        replica="host-2", replica_url="https://host-2", state=S.REPLICATING,
                        frequency_s=30, recovery_points=4, created=time.time() - 600)  # fmt: skip
    return base.model_copy(update=update)


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def value(text: str, name: str, **labels: str) -> float | None:
    return _samples(text).get((name, frozenset(labels.items())))


def promtool(text: str) -> str:
    """What ``promtool check metrics`` says about ``text`` (it must pass, with no lint)."""
    done = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=30, check=False)  # fmt: skip
    said = (done.stdout + done.stderr).strip()
    assert done.returncode == 0 and said == "", said
    return said


class Hosts:
    """A primary (host-1) and a replica host (host-2), each with a recorder and a collector."""

    def __init__(self, root: Path) -> None:
        now = time.time()
        self.primary = HostConfig(name="host-1", data_dir=root / "host-1", tls_dir=root / "tls")
        self.replica = HostConfig(name="host-2", data_dir=root / "host-2", tls_dir=root / "tls")
        for config in (self.primary, self.replica):
            config.data_dir.mkdir(parents=True)
        self.one = Catalog(self.primary.data_dir)
        self.two = Catalog(self.replica.data_dir)
        self.vms = FakeVms(self.primary, self.one)
        self.one.add_vm(_spec(), VmState.RUNNING)
        self.one.add_vm(_spec(OFF_UUID, "db"), VmState.OFF)
        self.one.put_relationship(_rel(Role.PRIMARY, last_started=now - 5, confirmed_point=2))
        self.one.add_cycle(UUID, CycleRecord(now - 65, True, CycleKind.SUCCESS, 4096, 0.2))
        self.one.add_cycle(UUID, CycleRecord(now - 35, False, CycleKind.NETWORK_FAILURE, 0, 1.0))
        self.one.add_cycle(UUID, CycleRecord(now - 5, True, CycleKind.SUCCESS, 8192, 0.3))
        self.jobs = JobRegistry(self.one)
        self.two.add_vm(_spec(), VmState.REPLICA)
        self.two.put_relationship(_rel(Role.REPLICA, storage=str(root / "replicas")))
        for i, age in enumerate((65, 5)):
            self.two.add_point(UUID, PointInfo(id=i + 1, time=now - age, file=f"p{i}", size=1000))
        self.store = ReplicaStore(self.replica, self.two, ReplicaServer(self.two, host="host-2"))
        self.lease: LeaseView | None = None
        self.rec_one = MetricsRecorder()
        self.rec_one.registry.register(StateCollector(
            host="host-1", catalog=self.one, jobs=self.jobs.all,
            replica_state=lambda uuid: pytest.fail("the primary asked for a replica's chain"),
            lease=lambda: self.lease))  # fmt: skip
        self.rec_two = MetricsRecorder()
        self.rec_two.registry.register(StateCollector(
            host="host-2", catalog=self.two, jobs=JobRegistry(self.two).all,
            replica_state=self.store.state))  # fmt: skip
        self.jobs.metrics = self.rec_one

    def scrape(self, which: str = "one") -> str:
        rec = self.rec_one if which == "one" else self.rec_two
        return generate_latest(rec.registry).decode()


@pytest.fixture
def hosts(tmp_path: Path) -> Hosts:
    return Hosts(tmp_path)


def test_the_collector_reports_vm_states_replication_and_jobs(hosts: Hosts) -> None:
    hosts.jobs.create("export", OFF_UUID, "db", "running")
    text = hosts.scrape()
    assert value(text, "ferry_agent_info", host="host-1", version=__import__("ferry").__version__)
    assert value(text, "ferry_vms", state="running") == 1
    assert value(text, "ferry_vms", state="off") == 1
    assert value(text, "ferry_vms", state="crashed") == 0
    assert value(text, "ferry_vm_state", vm="web", state="running") == 1
    assert value(text, "ferry_vm_state", vm="web", state="off") == 0
    assert value(text, "ferry_vm_state", vm="db", state="off") == 1
    assert value(text, "ferry_jobs", kind="export", state="running") == 1
    lag = value(text, "ferry_replication_lag_seconds", vm="web", role="primary")
    assert lag is not None and 5 <= lag < 10, lag
    rpo = value(text, "ferry_replication_rpo_seconds", vm="web")
    assert rpo is not None and 5 <= rpo < 10, rpo
    assert value(text, "ferry_replication_rpo_objective_seconds", vm="web", role="primary") == 30
    assert value(text, "ferry_replication_health", vm="web", health="normal") == 1
    assert value(text, "ferry_replication_health", vm="web", health="critical") == 0
    assert value(text, "ferry_replication_state", vm="web", role="primary",
                 state="replicating") == 1  # fmt: skip
    assert value(text, "ferry_replication_pending_bytes", vm="web") == 0
    assert value(text, "ferry_cluster_lease_held", cluster="c1") is None  # not a cluster node
    assert "process_resident_memory_bytes" not in text  # only the agent adds the process
    promtool(text)


def test_the_replica_host_reports_its_chain(hosts: Hosts) -> None:
    text = hosts.scrape("two")
    assert value(text, "ferry_replication_recovery_points", vm="web") == 2
    assert value(text, "ferry_replication_replica_bytes", vm="web") == 2000
    assert value(text, "ferry_replication_recovery_points_limit", vm="web", role="replica") == 4
    lag = value(text, "ferry_replication_lag_seconds", vm="web", role="replica")
    assert lag is not None and 5 <= lag < 10, lag
    assert value(text, "ferry_vms", state="replica") == 1
    # The primary's health and pending bytes are not the replica host's to say.
    assert value(text, "ferry_replication_health", vm="web", health="normal") is None
    promtool(text)


def test_states_follow_the_catalog_at_each_scrape(hosts: Hosts) -> None:
    hosts.one.set_state(UUID, VmState.CRASHED)
    rel = hosts.one.relationship(UUID)
    assert rel is not None
    hosts.one.put_relationship(rel.model_copy(update={"state": S.ERROR}))
    text = hosts.scrape()
    assert value(text, "ferry_vm_state", vm="web", state="crashed") == 1
    assert value(text, "ferry_vm_state", vm="web", state="running") == 0
    assert value(text, "ferry_replication_health", vm="web", health="critical") == 1
    assert value(text, "ferry_replication_state", vm="web", role="primary", state="error") == 1
    hosts.lease = LeaseView(cluster="c1", held=False)
    assert value(hosts.scrape(), "ferry_cluster_lease_held", cluster="c1") == 0


def test_cycle_ends_count_results_misses_and_stops() -> None:
    rec = MetricsRecorder()
    before = _rel(Role.PRIMARY, last_started=1000.0)
    # The next cycle started 100 s later at 30 s: slots at 1060 and 1090 were missed.
    ran = before.model_copy(update={"last_started": 1100.0})
    rec.replication_cycle(before, ran, {"result": "ok", "bytes": 1 << 20, "duration_s": 0.7})
    second = ran.model_copy(update={"last_started": 1130.0})
    rec.replication_cycle(
        ran, second, {"result": "network-failure", "error": "x", "duration_s": 3.0}
    )
    stopped = ran.model_copy(update={"last_started": 1160.0, "state": S.ERROR})
    rec.replication_cycle(second, stopped, {"result": "failure", "error": "pin",
                                            "duration_s": 0.1})  # fmt: skip
    rec.replication_cycle(stopped, stopped, {"result": "skipped", "reason": "not replicating"})
    rec.replication_cycle(None, stopped, {"result": "skipped", "reason": "gone"})
    text = generate_latest(rec.registry).decode()
    assert value(text, "ferry_replication_cycles_total", vm="web", result="ok") == 1
    assert value(text, "ferry_replication_cycles_total", vm="web", result="network") == 1
    assert value(text, "ferry_replication_cycles_total", vm="web", result="stopped") == 1
    assert value(text, "ferry_replication_failures_total", vm="web", cause="missed") == 2
    assert value(text, "ferry_replication_failures_total", vm="web", cause="network") == 1
    assert value(text, "ferry_replication_failures_total", vm="web", cause="stopped") == 1
    assert value(text, "ferry_replication_failures_total", vm="web", cause="error") is None
    assert value(text, "ferry_replication_cycle_duration_seconds_count", vm="web") == 1
    assert value(text, "ferry_replication_cycle_duration_seconds_sum", vm="web") == 0.7
    assert value(text, "ferry_replication_cycle_duration_seconds_bucket", vm="web",
                 le="0.5") == 0  # fmt: skip
    assert value(text, "ferry_replication_cycle_duration_seconds_bucket", vm="web",
                 le="1.0") == 1  # fmt: skip
    assert value(text, "ferry_replication_cycle_bytes_sum", vm="web") == 1 << 20
    promtool(text)


def test_a_move_is_counted_when_its_job_ends(hosts: Hosts) -> None:
    jobs = hosts.jobs
    ok = jobs.create("move", UUID, "web", "queued", target="host-2")
    jobs.update(ok, "copying-memory", phase="copying-memory")
    jobs.update(ok, progress={"ram_bytes": 300 << 20, "disk_bytes": 100 << 20})
    jobs.update(ok, "done", phase="done", result={"result": "ok", "total_s": 12.5,
                                                   "downtime_ms": 80})  # fmt: skip
    failed = jobs.create("move", UUID, "web", "queued", target="host-2")
    jobs.update(failed, "failed", phase="failed", error="the destination refused")
    export = jobs.create("export", OFF_UUID, "db", "running")
    jobs.update(export, "done")
    text = hosts.scrape()
    assert value(text, "ferry_migrations_total", result="ok") == 1
    assert value(text, "ferry_migrations_total", result="failed") == 1
    assert value(text, "ferry_migration_duration_seconds_sum", result="ok") == 12.5
    assert value(text, "ferry_migration_downtime_seconds_count") == 1
    assert value(text, "ferry_migration_downtime_seconds_sum") == pytest.approx(0.08)
    assert value(text, "ferry_migration_bytes_sum") == 400 << 20
    assert value(text, "ferry_job_ends_total", kind="export", state="done") == 1
    assert value(text, "ferry_job_ends_total", kind="move", state="done") == 1
    assert value(text, "ferry_jobs", kind="move", state="done") == 1
    assert value(text, "ferry_jobs", kind="move", state="failed") == 1
    # A phase change is not an end; nothing counts twice.
    jobs.update(ok, progress={"x": 1})
    assert value(hosts.scrape(), "ferry_migrations_total", result="ok") == 1
    promtool(text)


def test_the_lease_keeper_counts_renewals_and_fences() -> None:
    timings = ClusterTimings.from_ttl(4)

    async def main() -> str:
        clock = FakeClock()
        store = MemoryStore(clock)
        lease = await store.grant(timings.ttl_s)
        member = MemberRecord(name="host-1", url="https://host-1.test:8443", version="0.1.0",
                              functional_level=3, joined=clock.time())  # fmt: skip
        meta = ClusterMeta(name="c1", created=clock.time(), functional_level=3)
        membership = Membership(store, cluster="c1", node="host-1", lease=lease, timings=timings,
                                member=member, meta=meta, clock=clock.time)  # fmt: skip
        await membership.put_alive()
        rec = MetricsRecorder()

        async def fence(reason: str) -> list[str]:
            return []

        keeper = LeaseKeeper(membership, fence=fence, clock=clock, metrics=rec)
        task = asyncio.create_task(keeper.run())
        try:
            for _ in range(int(2.5 * 16)):  # renewals at 0, 1, 2
                clock.advance(1 / 16)
                await clock.settle()
            store.available = False  # etcd away: failed renewals, then the fence at 3.2 s
            for _ in range(3 * 16):  # the last renewal was sent at 2.0: fenced at 5.2
                clock.advance(1 / 16)
                await clock.settle()
        finally:
            await cancel_and_wait(task)
            if store._reaper is not None:
                await cancel_and_wait(store._reaper)
        return generate_latest(rec.registry).decode()

    text = asyncio.run(main())
    assert value(text, "ferry_cluster_lease_renewals_total", cluster="c1", result="ok") == 3
    failed = value(text, "ferry_cluster_lease_renewals_total", cluster="c1", result="failed")
    assert failed is not None and failed >= 1
    assert value(text, "ferry_cluster_fences_total", cluster="c1") == 1
    promtool(text)


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "192.168.1.5:9464", "[::]:9464",
                                    "metrics.example:9464"])  # fmt: skip
def test_metrics_listen_must_be_loopback(tmp_path: Path, listen: str) -> None:
    path = tmp_path / "host.toml"
    path.write_text(f'name = "h"\ndata_dir = "{tmp_path}/d"\ntls_dir = "{tmp_path}/t"\n'
                    f'metrics_listen = "{listen}"\n')  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        load_host_config(path)
    message = str(caught.value)
    assert "\n" not in message
    assert f"metrics_listen: {listen} is not a loopback address" in message
    assert "no authentication" in message


def test_metrics_listen_on_loopback_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "host.toml"
    path.write_text(f'name = "h"\ndata_dir = "{tmp_path}/d"\ntls_dir = "{tmp_path}/t"\n'
                    'metrics_listen = "127.0.0.2:9464"\n')  # fmt: skip
    assert load_host_config(path).metrics_address == ("127.0.0.2", 9464)


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in doc["panels"] for target in panel.get("targets", [])]


def test_the_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every query (as recording rules, Grafana's variables filled in)."""
    grafana = {"$__rate_interval": "2m", "$__range": "6h", "$host": ".*"}
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        for variable, example in grafana.items():
            expr = expr.replace(variable, example)
        assert "$" not in expr, expr
        rules.append({"record": f"ferry:dashboard_{i}", "expr": expr})
    path = tmp_path / "rules.json"  # YAML is a superset of JSON
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=30, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout, done.stdout


def dashboard_metric_names() -> set[str]:
    """Every ferry_/process_ metric name the dashboard's queries use."""
    exprs = dashboard_exprs()
    assert exprs, "the dashboard has no queries"
    return {name for expr in exprs for name in re.findall(r"\b(?:ferry|process)_[a-z0-9_]+", expr)}


def test_the_dashboard_uses_only_metrics_the_agent_exports(hosts: Hosts) -> None:
    """Every name in the dashboard is a sample name of a real scrape (so it cannot drift)."""
    from prometheus_client import ProcessCollector

    ProcessCollector(registry=hosts.rec_one.registry)
    hosts.rec_one.replication_cycle(_rel(Role.PRIMARY, last_started=1.0),
                                    _rel(Role.PRIMARY, last_started=2.0),
                                    {"result": "ok", "bytes": 1, "duration_s": 1.0})  # fmt: skip
    job = hosts.jobs.create("move", UUID, "web", "queued")
    hosts.jobs.update(job, "done", phase="done", result={"total_s": 1.0, "downtime_ms": 5},
                      progress={"ram_bytes": 1})  # fmt: skip
    hosts.lease = LeaseView(cluster="c1", held=True)
    hosts.rec_one.lease_renewal("c1", ok=True)
    hosts.rec_one.fenced("c1")
    hosts.rec_one.replication_cycle(_rel(Role.PRIMARY, last_started=1.0),
                                    _rel(Role.PRIMARY, last_started=2.0),
                                    {"result": "failure", "duration_s": 1.0})  # fmt: skip
    exported = {s.name for text in (hosts.scrape(), hosts.scrape("two"))
                for family in text_string_to_metric_families(text)
                for s in family.samples}  # fmt: skip
    used = dashboard_metric_names()
    assert used - exported == set(), f"the dashboard uses metrics not exported: {used - exported}"
    # It shows what the issue asks for.
    for name in ("ferry_replication_lag_seconds", "ferry_replication_rpo_seconds",
                 "ferry_replication_cycle_duration_seconds_bucket",
                 "ferry_migration_downtime_seconds_bucket", "ferry_jobs", "ferry_vms",
                 "ferry_replication_failures_total"):  # fmt: skip
        assert name in used, name


@pytest.mark.parametrize("recent_ok", [True, False])
def test_a_scrape_reads_one_hour_and_agrees_with_status(tmp_path: Path, recent_ok: bool) -> None:
    """Lag, health and RPO from this hour's cycles equal those from the day's (status)."""
    from ferry.host.replication.status import primary_view

    now = 1_000_000.0
    catalog = Catalog(tmp_path)
    catalog.add_vm(_spec(), VmState.RUNNING)
    rel = _rel(Role.PRIMARY, created=now - 86000, last_started=now - 10)
    catalog.put_relationship(rel)
    cycles = []
    for k in range(2880):  # a day at 30 s: every 7th failed; in the last hour maybe all
        started = now - 86400 + 30 * k
        bad = k % 7 == 0 or (not recent_ok and started > now - 5000)
        kind = CycleKind.NETWORK_FAILURE if bad else CycleKind.SUCCESS
        cycles.append(CycleRecord(started, not bad, kind, 0 if bad else 4096, 0.3 + k % 5))
    catalog.replace_cycles(UUID, cycles)
    rec = MetricsRecorder()
    rec.registry.register(StateCollector(host="host-1", catalog=catalog, jobs=list,
                                         replica_state=lambda u: pytest.fail("replica asked"),
                                         clock=lambda: now))  # fmt: skip
    text = generate_latest(rec.registry).decode()
    status = primary_view(rel, catalog.cycles(UUID), now)
    assert value(text, "ferry_replication_lag_seconds", vm="web", role="primary") == status["lag_s"]
    assert value(text, "ferry_replication_health", vm="web", health=status["health"]) == 1
    assert status["health"] == ("normal" if recent_ok else "warning")
    assert value(text, "ferry_replication_rpo_seconds", vm="web") == status["rpo_s"]
    assert value(text, "ferry_replication_rpo_p99_seconds", vm="web") == status["rpo_p99_s"]
