"""Copy jobs an agent kill left ``running`` are failed on the next start.

Nothing else ends them: their task died with the agent and ``job cancel`` refuses
replication jobs, so without this a planned failover's retry waited on a
``replication-resync`` job that could never end (docs/reliability.md).
"""

from __future__ import annotations

from pathlib import Path

from ferry.adapters.catalog import Catalog
from ferry.host.config import HostConfig
from ferry.host.jobs import JobRegistry
from ferry.host.replication.cycle import INITIAL_JOB, RESYNC_JOB
from ferry.host.replication.primary import ReplicationService
from ferry.host.replication.receiver import ReplicaStore
from ferry.host.replication.server import ReplicaServer
from ferry.host.turns import DiskTurns
from ferry.testing.peers import MemoryNetwork
from ferry.testing.vms import FakeVms

UUID = "0f1e2d3c-4b5a-4978-8a6b-5c4d3e2f1a0b"


def _service(root: Path, catalog: Catalog) -> ReplicationService:
    config = HostConfig(name="host-1", data_dir=root, tls_dir=root / "tls")
    vms = FakeVms(config, catalog)
    vms.turns = DiskTurns()  # type: ignore[attr-defined]
    jobs = JobRegistry(catalog)  # as the agent does: read back from the catalog
    store = ReplicaStore(config, catalog, ReplicaServer(catalog, host="host-1"))
    return ReplicationService(vms, jobs, store, MemoryNetwork().connector("host-1"))  # type: ignore[arg-type]


def test_copy_jobs_left_running_are_failed_and_others_kept(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path)
    before = JobRegistry(catalog)  # the agent that was killed
    resync = before.create(RESYNC_JOB, UUID, "web", "running", phase="copying")
    media = before.create(INITIAL_JOB, UUID, "db", "running", phase="to-media")
    ended = before.create(RESYNC_JOB, UUID, "web", "done")
    other = before.create("export", UUID, "web", "running")

    service = _service(tmp_path, catalog)
    service.recover()

    again = JobRegistry(catalog)  # what 'job show' reads after it
    assert again.get(resync.id).state == "failed"
    assert "next cycle starts it over" in again.get(resync.id).detail["error"]
    assert again.get(media.id).state == "failed"
    assert "enable it again" in again.get(media.id).detail["error"]
    assert again.get(ended.id).state == "done"
    assert again.get(other.id).state == "running"  # the exchange service's own
