"""A move's phases between two hosts without QEMU: real services, catalogs and peer layer.

Each host runs the real VmService (over its own SQLite catalog) and
MigrationService; the hosts reach each other through the in-memory peer
network, and each VM's QEMU is a scripted model (``ferry.testing.migration``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ferry.adapters.catalog import Catalog, JobRow, VmRecord
from ferry.core.migration import IncomingState, Phase, Storage
from ferry.core.spec import DiskSpec, NicSpec, VmSpec
from ferry.core.versions import MAX_CONFIG_VERSION
from ferry.core.vmstate import VmState
from ferry.errors import AuthError, ConflictError, InvalidInputError, QemuError, StateError
from ferry.host import jobs as jobs_module
from ferry.host.config import HostConfig
from ferry.host.jobs import Job, JobRegistry
from ferry.host.migration import source as source_module
from ferry.host.migration.service import MigrationService
from ferry.host.vms.service import VmService
from ferry.peer import migration as wire
from ferry.peer.server import PeerServer
from ferry.testing.migration import DISK_BYTES, IncomingQemu, SourceQemu
from ferry.testing.netdev import FakeLinks
from ferry.testing.peers import MemoryNetwork, host_cert
from ferry.testing.qmp import FakeQmp

MOVE_PHASES = ["queued", "preparing", "copying-disks", "copying-memory", "switching-over", "done"]


class QemulessVms(VmService):
    """The real VM service with each VM's QEMU replaced by a scripted model."""

    def __init__(self, config: HostConfig, catalog: Catalog) -> None:
        super().__init__(config, catalog, accelerator="tcg", host_memory=8 << 30, host_cpus=8)
        self.qemus: dict[str, FakeQmp] = {}
        self.incoming: IncomingQemu | None = None  # what launch_incoming starts
        self.source: SourceQemu | None = None  # whom that one listens to

    def channel(self, record: VmRecord) -> Any:
        if record.uuid not in self.qemus:
            raise QemuError(f"VM {record.name!r} has no attached QEMU")
        return self.qemus[record.uuid]

    async def launch_incoming(self, record: VmRecord) -> None:
        assert self.source is not None, "the test names the source QEMU first"
        self.incoming = IncomingQemu(self.source)
        self.qemus[record.uuid] = self.incoming.qmp

    async def forget(self, record: VmRecord, *, keep_disks: bool) -> None:
        self.qemus.pop(record.uuid, None)
        await super().forget(record, keep_disks=keep_disks)


@dataclass
class Host:
    name: str
    config: HostConfig
    catalog: Catalog
    vms: QemulessVms
    jobs: JobRegistry
    migrations: MigrationService
    server: PeerServer

    def vm(self, name: str) -> VmRecord | None:
        return self.catalog.find(name)


def make_host(network: MemoryNetwork, root: Path, name: str, *, shared: Path) -> Host:
    config = HostConfig(name=name, data_dir=root / name, tls_dir=root / "tls",
                        run_dir=root / f"run-{name}", qemu_img="true")  # fmt: skip
    config.data_dir.mkdir(parents=True)
    catalog = Catalog(config.data_dir)
    catalog.add_volume("shared", str(shared))
    vms = QemulessVms(config, catalog)
    jobs = JobRegistry(catalog)
    migrations = MigrationService(vms, jobs, network.connector(name))
    server = PeerServer()
    migrations.register(server)
    network.join(name, server)
    return Host(name, config, catalog, vms, jobs, migrations, server)


@dataclass
class Lab:
    network: MemoryNetwork
    one: Host
    two: Host
    root: Path

    def boot(self, name: str = "roamer", *, shared: bool = False, disks: int = 1) -> SourceQemu:
        """A running VM on host-1, its QEMU a model, its disks on the volume or local."""
        uuid = f"{name}-0000-uuid"
        where = self.root / "shared" / uuid if shared else self.one.vms.vm_dir(uuid)
        where.mkdir(parents=True, exist_ok=True)
        specs = []
        for index in range(disks):
            path = where / f"disk{index}.qcow2"
            path.write_bytes(b"qcow2")
            specs.append(DiskSpec(path=str(path), size=1 << 20, direct=shared))
        spec = VmSpec(uuid=uuid, name=name, config_version=MAX_CONFIG_VERSION,
                      memory=128 << 20, disks=tuple(specs))  # fmt: skip
        self.one.catalog.add_vm(spec, VmState.RUNNING)
        model = SourceQemu()
        self.one.vms.qemus[uuid] = model.qmp
        self.two.vms.source = model
        return model

    def move(self, name: str = "roamer", storage: Storage = Storage.AUTO, **kw: Any) -> Job:
        return self.one.migrations.start_move(name, to="host-2", to_url="https://host-2",
                                              storage=storage, max_bandwidth=kw.get("bw"),
                                              downtime_limit_ms=None)  # fmt: skip

    def peer_paths(self, job: Job) -> list[str]:
        prefix = f"/v1/peer/migrations/{job.id}"
        return [f"{m} {p.removeprefix(prefix) or '/'}" for _, _, m, p in self.network.calls
                if p.startswith("/v1/peer/migrations")]  # fmt: skip


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    monkeypatch.setattr(jobs_module, "PERSIST_EVERY_S", 0.0)
    shared = tmp_path / "shared"
    shared.mkdir()
    network = MemoryNetwork()
    one = make_host(network, tmp_path, "host-1", shared=shared)
    two = make_host(network, tmp_path, "host-2", shared=shared)
    yield Lab(network, one, two, tmp_path)
    one.catalog.close()
    two.catalog.close()


def phases(job: Job) -> list[str]:
    return list(job.detail["phase_started"])


async def ended(job: Job) -> Job:
    assert job.task is not None
    await job.task
    return job


def run_move(lab: Lab, **kw: Any) -> Job:
    """Start a move and wait until it ends."""

    async def go() -> Job:
        return await ended(lab.move(**kw))

    return asyncio.run(go())


async def reached(job: Job, phase: Phase, timeout: float = 5) -> None:
    """Until the job is in ``phase`` (it polls: a job announces nothing)."""
    for _ in range(int(timeout / 0.01)):
        if job.state == phase:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {job.id} is {job.state}, never {phase.value}")


def assert_back_on_source(lab: Lab, job: Job, model: SourceQemu) -> None:
    """The VM runs on host-1 as before; host-2 has no trace and was told to abort."""
    record = lab.one.vm("roamer")
    assert record is not None and record.state is VmState.RUNNING
    assert model.run == "running"
    assert lab.two.vm(record.uuid) is None
    assert not lab.two.vms.vm_dir(record.uuid).exists()
    assert "POST /abort" in lab.peer_paths(job)
    incoming = lab.two.jobs.find(job.id)
    assert incoming is None or incoming.state == IncomingState.ABORTED


# -- moves that work ------------------------------------------------------------------


def test_a_copy_move_walks_every_phase_and_the_vm_runs_on_the_destination(lab: Lab) -> None:
    model = lab.boot(disks=2)
    job = run_move(lab, storage=Storage.COPY)
    assert job.state == Phase.DONE, job.detail["error"]
    assert phases(job) == MOVE_PHASES
    assert job.detail["result"]["storage"] == "copy"
    result = job.detail["result"]
    # The guest's pause, from the source's STOP to the destination's RESUME;
    # QEMU's own (partial) figure apart.
    assert result["qemu_downtime_ms"] == 42
    assert result["downtime_source"] == "qemu-events"
    assert result["downtime_ms"] >= 1
    assert set(result["pause_phases_ms"]) == {"stopped->mirrors_done", "mirrors_done->continued",
                                              "continued->completed", "completed->loaded",
                                              "loaded->resumed"}  # fmt: skip
    assert result["disk_bytes"] == 2 * DISK_BYTES and result["memory_bytes"] == 4096
    arrived = lab.two.vm("roamer")
    assert arrived is not None and arrived.state is VmState.RUNNING
    assert [Path(d.path).parent for d in arrived.spec.disks] == [
        lab.two.vms.vm_dir(arrived.uuid)] * 2  # fmt: skip
    assert lab.one.vm("roamer") is None  # the source let go of it
    assert lab.two.jobs.get(job.id).state == IncomingState.DONE
    # Four status calls between launch and finish sample the destination's clock.
    assert lab.peer_paths(job) == ["POST /v1/peer/migrations", "POST /launch", *["GET /"] * 4,
                                   "POST /finish"]  # fmt: skip
    # The source's QEMU: configured, two mirrors, memory, then the switch-over.
    assert [c for c in model.qmp.actions() if c != "object-add"] == [
        "migrate-set-capabilities", "migrate-set-parameters",
        "blockdev-add", "blockdev-mirror", "blockdev-add", "blockdev-mirror",
        "migrate", "block-job-cancel", "block-job-cancel", "migrate-continue",
    ]  # fmt: skip
    assert lab.two.vms.incoming is not None
    # 'cont' first, while it still loads (QEMU runs the guest once loaded), then
    # the exports stop; the guest ran once, as QEMU's last step of the load.
    assert lab.two.vms.incoming.qmp.actions()[-2:] == ["cont", "nbd-server-stop"]
    assert [e["event"] for e in lab.two.vms.incoming.qmp.events].count("RESUME") == 1


def test_a_shared_storage_move_skips_the_disk_copy(lab: Lab) -> None:
    model = lab.boot(shared=True)
    job = run_move(lab)
    assert job.state == Phase.DONE, job.detail["error"]
    assert phases(job) == [p for p in MOVE_PHASES if p != "copying-disks"]
    assert job.detail["result"]["storage"] == "shared"
    arrived = lab.two.vm("roamer")
    assert arrived is not None
    assert arrived.spec.disks[0].path == str(lab.root / "shared" / arrived.uuid / "disk0.qcow2")
    assert Path(arrived.spec.disks[0].path).is_file()  # the source kept the shared disk
    assert "blockdev-mirror" not in model.qmp.commands()
    assert lab.two.vms.incoming is not None
    assert "nbd-server-start" not in lab.two.vms.incoming.qmp.commands()


def test_the_kernel_and_initrd_travel_ahead(lab: Lab) -> None:
    lab.boot(shared=True)
    kernel, initrd = lab.root / "vmlinuz", lab.root / "initrd"
    kernel.write_bytes(b"K" * 3000)
    initrd.write_bytes(b"I" * 10)
    record = lab.one.vm("roamer")
    assert record is not None
    lab.one.catalog.delete(record.uuid)
    lab.one.catalog.add_vm(record.spec.model_copy(update={"kernel": str(kernel),
                                                          "initrd": str(initrd)}),
                           VmState.RUNNING)  # fmt: skip
    job = run_move(lab)
    assert job.state == Phase.DONE, job.detail["error"]
    arrived = lab.two.vm("roamer")
    assert arrived is not None and arrived.spec.kernel and arrived.spec.initrd
    assert Path(arrived.spec.kernel).read_bytes() == b"K" * 3000
    assert Path(arrived.spec.initrd).read_bytes() == b"I" * 10
    assert lab.peer_paths(job)[1:3] == ["PUT /files/kernel", "PUT /files/initrd"]


# -- moves that fail leave the VM where it was ------------------------------------------


def _refuse_prepare(lab: Lab, model: SourceQemu) -> None:
    lab.two.catalog.add_vm(VmSpec(name="roamer", config_version=1, memory=1 << 20))


def _refuse_launch(lab: Lab, model: SourceQemu) -> None:
    real = lab.two.vms.launch_incoming

    async def launch(record: VmRecord) -> None:
        await real(record)
        assert lab.two.vms.incoming is not None
        lab.two.vms.incoming.qmp.fail("migrate-incoming", "Address already in use")

    lab.two.vms.launch_incoming = launch  # type: ignore[method-assign]


def _lose_a_mirror(lab: Lab, model: SourceQemu) -> None:
    model.qmp.on("blockdev-mirror", lambda args: {})  # accepted, but no job runs


def _break_the_stream(lab: Lab, model: SourceQemu) -> None:
    model.fail_migration = "Connection reset by peer"


def _destination_cannot_load(lab: Lab, model: SourceQemu) -> None:
    real = lab.two.vms.launch_incoming

    async def launch(record: VmRecord) -> None:
        await real(record)
        assert lab.two.vms.incoming is not None
        lab.two.vms.incoming.loads = "failed"

    lab.two.vms.launch_incoming = launch  # type: ignore[method-assign]


@pytest.mark.parametrize(
    ("breaker", "failed_in", "error"),
    [
        (_refuse_prepare, Phase.PREPARING, "host 'host-2' already has a VM named 'roamer'"),
        (_refuse_launch, Phase.PREPARING, "refused migrate-incoming: Address already in use"),
        (_lose_a_mirror, Phase.COPYING_DISKS, "disk copy mirror0-"),
        (_break_the_stream, Phase.COPYING_MEMORY, "memory copy failed: Connection reset"),
        (_destination_cannot_load, Phase.SWITCHING_OVER,
         "host 'host-2' could not resume the VM (the incoming migration is failed"),
    ],
)  # fmt: skip
def test_a_failure_in_any_phase_leaves_the_vm_on_the_source(
    lab: Lab, breaker: Any, failed_in: Phase, error: str
) -> None:
    model = lab.boot()
    breaker(lab, model)
    job = run_move(lab, storage=Storage.COPY)
    assert job.state == Phase.FAILED
    assert error in job.detail["error"]
    assert phases(job)[-2:] == [failed_in.value, "failed"]
    assert_back_on_source(lab, job, model)
    if breaker is _refuse_prepare:  # the destination's own VM of that name is untouched
        other = lab.two.vm("roamer")
        assert other is not None and other.state is VmState.OFF
    if failed_in in (Phase.COPYING_MEMORY, Phase.SWITCHING_OVER):
        assert "migrate_cancel" in model.qmp.commands()  # the undo ran
    if failed_in is not Phase.PREPARING:
        assert [a for a in model.qmp.arguments("blockdev-del") if a] == [
            {"node-name": f"nbd0-{job.id}"}]  # fmt: skip


def test_a_destination_that_gives_up_fails_the_copy(lab: Lab) -> None:
    model = lab.boot()
    model.hold = True

    async def go() -> Job:
        job = lab.move(storage=Storage.COPY)
        await reached(job, Phase.COPYING_MEMORY)
        incoming = lab.two.jobs.get(job.id)
        await lab.two.migrations.destination.abort_incoming(incoming, "disk full")
        return await ended(job)

    job = asyncio.run(go())
    assert job.state == Phase.FAILED
    assert job.detail["error"] == "host 'host-2' gave up receiving: disk full"
    assert_back_on_source(lab, job, model)


def test_a_silent_destination_fails_the_move(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source_module, "PEER_CHECK_S", 0.0)
    monkeypatch.setattr(source_module, "PEER_GRACE_S", 0.3)
    model = lab.boot()
    model.hold = True

    async def go() -> Job:
        job = lab.move(storage=Storage.COPY)
        await reached(job, Phase.COPYING_MEMORY)
        lab.network.leave("host-2")
        return await ended(job)

    job = asyncio.run(go())
    assert job.state == Phase.FAILED
    assert job.detail["error"] == "the agent of host 'host-2' stopped answering"
    record = lab.one.vm("roamer")
    assert record is not None and record.state is VmState.RUNNING and model.run == "running"


# -- cancellation ---------------------------------------------------------------------


def test_cancel_mid_copy_undoes_the_move(lab: Lab) -> None:
    model = lab.boot()
    model.hold = True

    async def go() -> Job:
        job = lab.move(storage=Storage.COPY)
        await reached(job, Phase.COPYING_MEMORY)
        lab.one.migrations.cancel(job.id)
        with pytest.raises(asyncio.CancelledError):
            await ended(job)
        return job

    job = asyncio.run(go())
    assert job.state == Phase.CANCELLED
    assert job.detail["error"] == "cancelled; the VM runs on host-1 as before"
    assert phases(job) == ["queued", "preparing", "copying-disks", "copying-memory", "cancelled"]
    assert_back_on_source(lab, job, model)
    assert "migrate_cancel" in model.qmp.commands()


def test_cancel_is_refused_once_the_switch_over_began_or_the_move_ended(lab: Lab) -> None:
    lab.boot(shared=True)

    async def go() -> None:
        job = lab.move()
        job.state = Phase.SWITCHING_OVER.value  # as the job would be then
        with pytest.raises(StateError, match="too late to cancel"):
            lab.one.migrations.cancel(job.id)
        job.state = Phase.QUEUED.value
        await ended(job)
        with pytest.raises(StateError, match="has already ended"):
            lab.one.migrations.cancel(job.id)

    asyncio.run(go())


# -- who may call the destination ----------------------------------------------------------


def _prepare_body(lab: Lab) -> wire.PrepareRequest:
    spec = VmSpec(uuid="visitor-uuid", name="visitor", config_version=MAX_CONFIG_VERSION,
                  memory=128 << 20)  # fmt: skip
    return wire.PrepareRequest(job_id="j-auth", spec=spec, storage=Storage.AUTO)


def test_only_a_host_may_prepare_and_it_is_told_before_the_body_is_read(lab: Lab) -> None:
    server = lab.two.server

    async def go() -> None:
        for cert in (host_cert("admin", role=None), host_cert("root", role=None)):
            status, payload = await server.dispatch(cert, "POST", "/v1/peer/migrations",
                                                    body=b'{"spec": {}}')  # fmt: skip
            assert status == 403
            assert payload["error"]["message"] == "only a ferry host may send a VM here"

    asyncio.run(go())
    assert lab.two.jobs.all() == [] and lab.two.catalog.vms() == []


@pytest.mark.parametrize("route", [wire.FILE, wire.LAUNCH, wire.FINISH, wire.ABORT, wire.STATUS])
def test_only_the_host_that_prepared_a_move_may_act_on_it(lab: Lab, route: Any) -> None:
    lab.network.join("host-3", PeerServer())

    async def go() -> None:
        async with lab.network.connector("host-1").connect("host-2", "") as peer:
            await peer.call(wire.PREPARE, _prepare_body(lab))
        async with lab.network.connector("host-3").connect("host-2", "") as intruder:
            params = {"id": "j-auth", "file": "kernel"} if route is wire.FILE else {"id": "j-auth"}
            data = b"evil" if route is wire.FILE else None
            with pytest.raises(AuthError, match="not an incoming move from 'host-3'"):
                await intruder.call(route, data=data, **params)

    asyncio.run(go())
    incoming = lab.two.jobs.get("j-auth")
    assert incoming.state == IncomingState.RECEIVING  # nothing changed
    record = lab.two.vm("visitor")
    assert record is not None and record.state is VmState.MIGRATING
    assert not (lab.two.vms.vm_dir(record.uuid) / "kernel").exists()


def test_an_incoming_move_that_ended_refuses_launch_and_files(lab: Lab) -> None:
    async def go() -> None:
        async with lab.network.connector("host-1").connect("host-2", "") as peer:
            await peer.call(wire.PREPARE, _prepare_body(lab))
            assert (await peer.call(wire.ABORT, id="j-auth")).state is IncomingState.ABORTED
            with pytest.raises(StateError, match="cannot launch incoming move j-auth: it is "
                               r"aborted \(needs: receiving\)"):  # fmt: skip
                await peer.call(wire.LAUNCH, id="j-auth")
            with pytest.raises(StateError, match="it is aborted"):
                await peer.call(wire.FILE, data=b"k", id="j-auth", file="kernel")
            again = await peer.call(wire.FINISH, id="j-auth")  # a retry reports the outcome
            assert again.state is IncomingState.ABORTED
            assert again.error == "the source called the move off"

    asyncio.run(go())


# -- after an agent restart ------------------------------------------------------------------


def _restart(host: Host, network: MemoryNetwork) -> MigrationService:
    """A new agent on the same catalog (its jobs read back); QEMUs kept running."""
    jobs = JobRegistry(host.catalog)
    service = MigrationService(host.vms, jobs, network.connector(host.name))
    host.jobs = jobs
    return service


def test_a_restarted_source_undoes_a_move_mid_copy(lab: Lab) -> None:
    model = lab.boot()
    model.hold = True

    async def go() -> Job:
        job = await _agent_dies_mid_move(lab)  # the agent dies: no undo runs ...
        lab.one.catalog.put_job(_row_of(job, Phase.COPYING_MEMORY))  # ... nor is it recorded
        service = _restart(lab.one, lab.network)
        await service.recover()
        return service.jobs.get(job.id)

    job = asyncio.run(go())
    assert job.state == Phase.FAILED
    assert job.detail["error"] == ("the agent restarted during the move; "
                                   "the VM stays on host-1")  # fmt: skip
    assert_back_on_source(lab, job, model)


def test_a_restarted_source_calls_off_a_destination_that_never_resumed(lab: Lab) -> None:
    """Killed after QEMU's stream completed, before ``finish``: the destination still
    receives and never resumes on its own, so the restarted source calls it off at
    once (it used to ask for a minute, the agent serving nothing meanwhile)."""
    model = lab.boot()
    model.hold = True

    async def go() -> tuple[Job, float]:
        job = await _agent_dies_mid_move(lab)  # the agent dies at the switch-over ...
        del lab.one.migrations.source.undo  # the restarted agent's undo is the real one
        model.run = "postmigrate"  # ... after QEMU sent the last pages
        model.migration = "completed"
        lab.one.catalog.put_job(_row_of(job, Phase.SWITCHING_OVER))
        service = _restart(lab.one, lab.network)
        started = time.monotonic()
        await service.recover()
        return service.jobs.get(job.id), time.monotonic() - started

    job, took = asyncio.run(go())
    assert took < 10, took  # not OUTCOME_WAIT_S
    assert job.state == Phase.FAILED
    assert "the agent restarted during the switch-over" in job.detail["error"]
    assert lab.two.jobs.get(job.id).state == IncomingState.ABORTED
    assert_back_on_source(lab, job, model)


def test_a_restarted_source_finishes_a_move_whose_hand_over_was_written(lab: Lab) -> None:
    """Killed at the switch-over after the cluster's store gave the VM to the
    destination (``handover_revision`` in the job): the restarted source must not
    call the destination off and run the VM here; it asks the destination to resume."""
    model = lab.boot()
    model.hold = True

    async def go() -> Job:
        job = await _agent_dies_mid_move(
            lab
        )  # the agent dies at the switch-over, after the hand-over
        del lab.one.migrations.source.undo
        model.run = "postmigrate"
        model.migration = "completed"
        row = _row_of(job, Phase.SWITCHING_OVER)
        detail = dict(json.loads(row.detail), handover_revision=42, to_cluster="c2")
        lab.one.catalog.put_job(dataclasses.replace(row, detail=json.dumps(detail)))
        service = _restart(lab.one, lab.network)
        await service.recover()
        return service.jobs.get(job.id)

    job = asyncio.run(go())
    assert job.state == Phase.DONE, job.detail
    assert lab.two.jobs.get(job.id).state == IncomingState.DONE
    assert lab.one.vm("roamer") is None  # forgotten here: it runs there


def test_a_restarted_destination_aborts_what_did_not_arrive(lab: Lab) -> None:
    async def go() -> None:
        async with lab.network.connector("host-1").connect("host-2", "") as peer:
            await peer.call(wire.PREPARE, _prepare_body(lab))
        await _restart(lab.two, lab.network).recover()

    asyncio.run(go())
    incoming = lab.two.jobs.get("j-auth")
    assert incoming.state == IncomingState.ABORTED
    assert incoming.detail["error"] == "the agent restarted during the move"
    assert lab.two.vm("visitor") is None


async def _no_undo(*args: Any) -> None:
    return None


async def _agent_dies_mid_move(lab: Lab) -> Job:
    """A copy move whose source agent dies while the memory is copied: no undo runs."""
    job = lab.move(storage=Storage.COPY)
    await reached(job, Phase.COPYING_MEMORY)
    assert job.task is not None
    job.task.cancel()
    lab.one.migrations.source.undo = _no_undo  # type: ignore[method-assign]
    with pytest.raises(asyncio.CancelledError):
        await job.task
    return job


def _row_of(job: Job, phase: Phase) -> JobRow:
    detail = dict(job.detail, phase=phase.value)
    return JobRow(job.id, job.kind, job.vm_uuid, job.vm_name, phase.value, json.dumps(detail),
                  job.created, job.updated)  # fmt: skip


# -- networks ---------------------------------------------------------------------------

MAC = "02:00:00:00:0a:01"


def _with_nic(lab: Lab, network: str = "lab") -> None:
    record = lab.one.vm("roamer")
    assert record is not None
    lab.one.catalog.update_spec(record.spec.model_copy(update={
        "nics": (NicSpec(network=network, mac=MAC),)}))  # fmt: skip


def test_a_move_to_a_host_without_the_network_is_refused_before_any_job(lab: Lab) -> None:
    lab.boot()
    _with_nic(lab)
    with pytest.raises(InvalidInputError) as refused:
        asyncio.run(lab.one.migrations.preflight("roamer", to="host-2", to_url="https://host-2",
                                                 network_map={}))  # fmt: skip
    assert str(refused.value).startswith("host 'host-2' has no network 'lab', which VM 'roamer'")
    # Only the question crossed; no job, no trace on either host.
    assert [p for _, _, _, p in lab.network.calls] == ["/v1/peer/migrations/check"]
    assert lab.one.jobs.all() == [] and lab.two.jobs.all() == []
    assert lab.two.vm("roamer") is None


def test_a_mapped_move_arrives_on_the_destinations_network_and_announces(lab: Lab) -> None:
    links = FakeLinks()
    links.add_bridge("br-prod")
    lab.two.vms.networks.links = links
    asyncio.run(lab.two.vms.networks.add("prod", "br-prod"))
    lab.boot()
    _with_nic(lab)

    async def go() -> Job:
        await lab.one.migrations.preflight("roamer", to="host-2", to_url="https://host-2",
                                           network_map={"lab": "prod"})  # fmt: skip
        job = lab.one.migrations.start_move("roamer", to="host-2", to_url="https://host-2",
                                            storage=Storage.COPY, max_bandwidth=None,
                                            downtime_limit_ms=None,
                                            network_map={"lab": "prod"})  # fmt: skip
        return await ended(job)

    job = asyncio.run(go())
    assert job.state == Phase.DONE, job.detail["error"]
    arrived = lab.two.vm("roamer")
    assert arrived is not None and arrived.spec.nics == (NicSpec(network="prod", mac=MAC),)
    # After its cont, the destination asked QEMU to announce the NIC's MAC.
    incoming = lab.two.vms.incoming
    assert incoming is not None
    actions = incoming.qmp.actions()
    assert actions[-1] == "announce-self" and "cont" in actions[:-1]


def test_a_move_whose_mac_another_vm_uses_on_the_destination_is_refused(lab: Lab) -> None:
    links = FakeLinks()
    links.add_bridge("br-lab")
    lab.two.vms.networks.links = links
    asyncio.run(lab.two.vms.networks.add("lab", "br-lab"))
    lab.two.catalog.add_vm(VmSpec(name="squatter", config_version=1, memory=1 << 20,
                                  nics=(NicSpec(network="lab", mac=MAC),)))  # fmt: skip
    lab.boot()
    _with_nic(lab)
    with pytest.raises(ConflictError) as refused:
        asyncio.run(lab.one.migrations.preflight("roamer", to="host-2", to_url="https://host-2",
                                                 network_map={}))  # fmt: skip
    assert f"MAC {MAC} of VM 'roamer' is used by VM 'squatter' on host 'host-2'" in str(
        refused.value
    )
    # The prepare (a source that skipped the check) refuses it too, leaving nothing.
    record = lab.one.vm("roamer")
    assert record is not None
    body = {"job_id": "j-mac", "spec": record.spec.model_dump(mode="json"), "storage": "copy"}
    raw = json.dumps(body).encode()
    status, reply = asyncio.run(
        lab.two.server.dispatch(host_cert("host-1"), "POST", "/v1/peer/migrations", body=raw)
    )
    assert status >= 400 and "is used by VM 'squatter'" in reply["error"]["message"]
    assert lab.two.vm("roamer") is None and lab.two.jobs.find("j-mac") is None
