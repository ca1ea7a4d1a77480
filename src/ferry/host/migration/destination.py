"""The incoming side of a move: the destination answering the source's peer calls.

The source host prepares a move (``POST /v1/peer/migrations``, only with a
host certificate; the wire format is :mod:`ferry.peer.migration`), which
records an ``incoming`` job under the source's job id, the VM in the catalog
as migrating and its empty disks for a copy. Every later call (files,
launch, finish, abort, status) is answered only for the host that prepared
that move. The source's certificate DN becomes QEMU's ``tls-authz``
identity, so only that host's QEMU may feed the streams. The job's state
changes only by :func:`ferry.core.migration.incoming_step`; an aborted move
leaves no trace here (shared disks stay where they are).

The source may call a move off while one of its calls is still being
answered here (the HTTP server does not stop a handler whose caller went
away). So prepare, file, launch and abort of one move take turns (one lock
per move), and an abort that finds no move yet is remembered: the prepare
that comes after it is refused. A cancel at any point before switch-over
thus leaves no record, QEMU or file of the VM here.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from ferry.adapters import qemu_img
from ferry.adapters.firmware import check_firmware_here
from ferry.adapters.migration import MigrationStatus
from ferry.adapters.migration import incoming as qemu_incoming
from ferry.adapters.migration.run_state import run_state_events
from ferry.adapters.pki import CertInfo, Role, qemu_dn
from ferry.core import log_context
from ferry.core.cpu_models import check_cpu
from ferry.core.migration import (
    IncomingOp,
    IncomingState,
    Storage,
    choose_storage,
    incoming_ended,
    incoming_step,
)
from ferry.core.network import apply_network_map, check_networks, vm_networks
from ferry.core.spec import DiskSpec, VmSpec, check_resources
from ferry.core.versions import check_host_runs
from ferry.core.vmstate import VmOp, VmState
from ferry.errors import AuthError, ConflictError, FerryError, InvalidInputError, MoveFailedError
from ferry.host.jobs import Job, JobRegistry
from ferry.host.migration.attempt import INCOMING, KERNEL_FILES
from ferry.host.vms.service import VmService
from ferry.peer import migration as wire
from ferry.peer.routes import NoBody, Upload
from ferry.peer.server import Call, PeerServer

log = logging.getLogger(__name__)

RESUME_WAIT_S = 5.0  # post-copy: QEMU starts the vCPUs once the device state is in
RESUME_EVENT_S = 0.5  # pre-copy: the RESUME event comes with 'cont' (this is a margin)
CALLED_OFF_KEPT = 256  # aborts of moves not prepared yet, remembered to refuse their prepare


def _only_hosts(caller: CertInfo, params: dict[str, str]) -> None:
    """Checked before the body is read: nobody else learns what it must hold."""
    if caller.role is not Role.HOST:
        raise AuthError("only a ferry host may send a VM here")


def _bind_log(job: Job) -> None:
    """This request's log lines are about ``job`` (its id is the source's move job's)."""
    log_context.bind(vm=job.vm_name, vm_uuid=job.vm_uuid, job=job.id, kind=job.kind)


class MoveDestination:
    """The moves arriving on this host."""

    def __init__(self, vms: VmService, jobs: JobRegistry) -> None:
        self.vms = vms
        self.jobs = jobs
        self.config = vms.config
        self._turns: dict[str, asyncio.Lock] = {}  # move id -> its calls take turns
        self._called_off: dict[str, str] = {}  # move id -> source host, aborted before prepare

    @property
    def host(self) -> str:
        return self.config.name

    def _turn(self, job_id: str) -> asyncio.Lock:
        """The lock one move's prepare, file, launch and abort calls take in turn."""
        return self._turns.setdefault(job_id, asyncio.Lock())

    def register(self, server: PeerServer) -> None:
        server.handle(wire.CHECK, self.check, guard=_only_hosts)
        server.handle(wire.PREPARE, self.prepare, guard=_only_hosts)
        server.handle(wire.FILE, self.receive_file)
        server.handle(wire.LAUNCH, self.launch)
        server.handle(wire.FINISH, self.finish)
        server.handle(wire.ABORT, self.abort)
        server.handle(wire.STATUS, self.status)

    def is_incoming(self, uuid: str) -> bool:
        """True while a VM is arriving here and still runs on its source."""
        return self.receiving(uuid) is not None

    def _incoming(self, job_id: str, caller: CertInfo) -> Job:
        """The incoming job ``job_id``, if ``caller`` is the host that prepared it."""
        job = self.jobs.get(job_id)
        if job.kind != INCOMING or job.detail.get("source") != caller.common_name:
            raise AuthError(f"job {job_id} is not an incoming move from {caller.common_name!r}")
        _bind_log(job)
        return job

    def _step(self, job: Job, op: IncomingOp, **detail: Any) -> None:
        """The one writer of an incoming job's state, by the table in core."""
        new = incoming_step(IncomingState(job.state), op, job=job.id)
        self.jobs.update(job, new.value, **detail)

    @staticmethod
    def _outcome(job: Job) -> wire.IncomingOutcome:
        return wire.IncomingOutcome(state=IncomingState(job.state), error=job.detail.get("error"),
                                    clock=time.time(), loaded_at=job.detail.get("loaded_at"),
                                    resumed_at=job.detail.get("resumed_at"),
                                    loaded_status=job.detail.get("loaded_status"))  # fmt: skip

    # -- the source's calls, in order ---------------------------------------------

    def _check_networks(self, spec: VmSpec, network_map: Mapping[str, str]) -> VmSpec:
        """The VM as it would arrive, or the one-line refusal naming a missing network."""
        check_networks(spec, host=self.host, host_networks=self.vms.networks.all(),
                       network_map=network_map)  # fmt: skip
        return apply_network_map(spec, network_map)

    async def check(self, call: Call[wire.CheckRequest]) -> wire.CheckReply:
        """Before the source starts a move: could the VM come here?"""
        request = call.body
        check_cpu(request.spec.cpu_model, self.vms.cpu, vm=request.spec.name)
        check_firmware_here(request.spec.firmware, self.config.firmware_descriptors,
                            host=self.config.name, vm=request.spec.name)  # fmt: skip
        arriving = self._check_networks(request.spec, request.network_map)
        await self.vms.networks.check_runnable(arriving)  # each network's bridge is there, too
        self.vms.networks.check_macs_free(arriving)
        return wire.CheckReply(networks=vm_networks(arriving))

    async def prepare(self, call: Call[wire.PrepareRequest]) -> wire.PrepareReply:
        # Taken before the first await: an abort sent after this call waits for it.
        job_id = call.body.job_id
        async with self._turn(job_id):
            try:
                return await self._prepare(call)
            finally:
                job = self.jobs.find(job_id)
                if job is None or incoming_ended(IncomingState(job.state)):
                    self._turns.pop(job_id, None)

    async def _prepare(self, call: Call[wire.PrepareRequest]) -> wire.PrepareReply:
        caller, request = call.caller, call.body
        if self._called_off.get(request.job_id) == caller.common_name:
            raise MoveFailedError(f"move {request.job_id} was called off by its source")
        spec = request.spec
        # The source sends the spec with its network map applied already; the
        # bridges were probed by the check and are again when QEMU starts.
        self._check_networks(spec, {})
        self.vms.networks.check_macs_free(spec)
        check_cpu(spec.cpu_model, self.vms.cpu, vm=spec.name)
        check_firmware_here(spec.firmware, self.config.firmware_descriptors,
                            host=self.config.name, vm=spec.name)  # fmt: skip
        check_host_runs(spec.config_version, self.config.functional_level,
                        host=self.host, vm=spec.name)  # fmt: skip
        check_resources(spec.memory, spec.cpus, host_memory=self.vms.host_memory,
                        host_cpus=self.vms.host_cpus)  # fmt: skip
        if self.vms.catalog.find(spec.name) or self.vms.catalog.find(spec.uuid):
            raise ConflictError(f"host {self.host!r} already has a VM named {spec.name!r}")
        receiving = [j for j in self.jobs.all()
                     if j.kind == INCOMING and j.state == IncomingState.RECEIVING]  # fmt: skip
        if len(receiving) >= self.config.max_live_migrations:
            raise ConflictError(f"host {self.host!r} is receiving {len(receiving)} VMs already")

        volumes = self.vms.catalog.volumes()
        shared_paths: list[str] = []
        for location in request.disk_volumes:
            if location is None or location[0] not in volumes:
                break
            path = Path(volumes[location[0]]) / location[1]
            if not path.is_file():
                break
            shared_paths.append(str(path))
        visible = bool(spec.disks) and len(shared_paths) == len(spec.disks)
        storage = choose_storage(request.storage, visible=visible, vm=spec.name, host=self.host)

        files_dir = self._files_dir(request, volumes, self.vms.vm_dir(spec.uuid))
        log_context.bind(vm=spec.name, vm_uuid=spec.uuid, job=request.job_id, kind=INCOMING)
        job = self.jobs.adopt(request.job_id, INCOMING, spec.uuid, spec.name,
                              IncomingState.RECEIVING.value, source=caller.common_name,
                              source_dn=qemu_dn(caller), storage=storage.value,
                              postcopy=request.postcopy,
                              # a takeover of the VM's replication must come with it
                              source_thumbprint=caller.thumbprint)  # fmt: skip
        vm_dir = self.vms.vm_dir(spec.uuid)
        if files_dir != vm_dir:
            self.jobs.update(job, files_dir=str(files_dir))
        try:
            vm_dir.mkdir(parents=True, exist_ok=True)
            files_dir.mkdir(parents=True, exist_ok=True)
            disks = []
            for index, disk in enumerate(spec.disks):
                if storage is Storage.SHARED:
                    disks.append(disk.model_copy(update={"path": shared_paths[index]}))
                else:
                    path = files_dir / f"disk{index}.qcow2"
                    await qemu_img.create(path, disk.size, qemu_img=self.config.qemu_img)
                    disks.append(DiskSpec(path=str(path), size=disk.size, format="qcow2",
                                          direct=disk.direct and files_dir != vm_dir))  # fmt: skip
            local = spec.model_copy(update={
                "disks": tuple(disks),
                "kernel": str(files_dir / "kernel") if spec.kernel else None,
                "initrd": str(files_dir / "initrd") if spec.initrd else None,
            })  # fmt: skip
            self.vms.catalog.add_vm(local, VmState.MIGRATING)
        except BaseException as exc:
            await self.abort_incoming(job, f"prepare failed: {exc}")
            raise
        return wire.PrepareReply(storage=storage)

    @staticmethod
    def _files_dir(request: wire.PrepareRequest, volumes: Mapping[str, str], vm_dir: Path) -> Path:
        """Where copied disks and boot files go: the VM dir, or ``<volume>/<uuid>/`` of the
        volume a move into a cluster names (host/cluster/crossing.py)."""
        if request.into_volume is None:
            return vm_dir
        if request.into_volume not in volumes:
            listed = ", ".join(sorted(volumes)) or "none"
            raise InvalidInputError(f"this host has no volume {request.into_volume!r} "
                                    f"(volumes: {listed})")  # fmt: skip
        return Path(volumes[request.into_volume]) / request.spec.uuid

    async def receive_file(self, call: Call[Upload]) -> wire.FileReceived:
        job = self._incoming(call.params["id"], call.caller)
        name = call.params["file"]
        if name not in KERNEL_FILES:
            raise InvalidInputError(f"unknown VM file {name!r}")
        async with self._turn(job.id):
            incoming_step(IncomingState(job.state), IncomingOp.RECEIVE_FILE, job=job.id)
            where = job.detail.get("files_dir") or self.vms.vm_dir(job.vm_uuid)
            await _write(Path(where) / name, call.stream)
        return wire.FileReceived(received=name)

    async def launch(self, call: Call[NoBody]) -> wire.LaunchReply:
        job = self._incoming(call.params["id"], call.caller)
        async with self._turn(job.id):
            return await self._launch(job)

    async def _launch(self, job: Job) -> wire.LaunchReply:
        incoming_step(IncomingState(job.state), IncomingOp.LAUNCH, job=job.id)
        record = self.vms.get(job.vm_uuid)
        tls = not self.config.insecure_migration
        copy = job.detail["storage"] == Storage.COPY
        try:
            self.vms.exit_hooks[record.uuid] = lambda: self._qemu_exited(job)
            await self.vms.launch_incoming(record)
            endpoints = await qemu_incoming.receive(
                self.vms.channel(record),
                tag=job.id,
                address=self.config.address[0],
                tls_dir=self.config.tls_dir if tls else None,
                source_dn=job.detail["source_dn"],
                disks=len(record.spec.disks) if copy else 0,
                postcopy=bool(job.detail.get("postcopy")),
            )
        except BaseException as exc:
            await self.abort_incoming(job, f"launch failed: {exc}")
            raise
        nbd = None
        if endpoints.nbd is not None:
            nbd = wire.NbdEndpoint(host=endpoints.nbd[0], port=endpoints.nbd[1])
        return wire.LaunchReply(uri=endpoints.uri, nbd=nbd, tls=tls)

    async def finish(self, call: Call[NoBody]) -> wire.IncomingOutcome:
        """Switch-over: resume here. Idempotent: a repeated call reports the outcome."""
        return await self._finish(self._incoming(call.params["id"], call.caller))

    def receiving(self, vm_uuid: str) -> Job | None:
        """The incoming move of VM ``vm_uuid`` still receiving here, if any."""
        return next((job for job in self.jobs.all() if job.kind == INCOMING
                     and job.state == IncomingState.RECEIVING
                     and job.vm_uuid == vm_uuid), None)  # fmt: skip

    async def finish_without_source(self, job: Job, why: str) -> wire.IncomingOutcome:
        """Resume here a VM whose source is lost after the switch-over began.

        Only the cluster layer calls this, once the cluster's store gave the VM
        to this node and the source node's lease is gone (its QEMUs fenced), so
        the source can neither resume nor take it back. As :meth:`finish`.
        """
        log.getChild(job.vm_name).warning("move %s: %s; resuming it here", job.id, why)
        self.jobs.update(job, finished_without_source=why)
        return await self._finish(job)

    async def _finish(self, job: Job) -> wire.IncomingOutcome:
        if incoming_ended(IncomingState(job.state)):
            return self._outcome(job)
        record = self.vms.get(job.vm_uuid)
        async with self.vms.lock(record.uuid):
            if incoming_ended(IncomingState(job.state)):  # the other caller finished it
                return self._outcome(job)
            try:
                channel = self.vms.channel(record)
                copied = job.detail["storage"] == Storage.COPY and bool(record.spec.disks)
                with run_state_events(channel) as run_state:
                    # The source may ask before its last pages went (it does, unless a
                    # switch guard acts between): QEMU runs the guest once it loaded them.
                    await qemu_incoming.autostart(channel)
                    status = await qemu_incoming.settled(channel)
                    if status not in qemu_incoming.RUNNABLE:
                        raise MoveFailedError(f"the incoming migration is {status}, not completed")
                    loaded_at = time.time()
                    self.vms.exit_hooks.pop(record.uuid, None)
                    postcopy = status is MigrationStatus.POSTCOPY_ACTIVE
                    resumed_at = await run_state.first_resume(
                        RESUME_WAIT_S if postcopy else RESUME_EVENT_S
                    )
                    await qemu_incoming.resume(channel, nbd=copied,
                                               announce=bool(record.spec.nics))  # fmt: skip
                    resumed_at = resumed_at or await run_state.first_resume(RESUME_EVENT_S)
                self.jobs.update(job, loaded_at=loaded_at, resumed_at=resumed_at,
                                 loaded_status=status.value)  # fmt: skip
                self.vms.apply(record, VmOp.ARRIVED)
            except FerryError as exc:
                words = self.vms.last_words(record.uuid)
                reason = f"{exc} (QEMU said: {words})" if words else str(exc)
                await self.abort_incoming(job, reason)
                return wire.IncomingOutcome(state=IncomingState(job.state), error=reason)
            self._step(job, IncomingOp.RESUME)
        self._turns.pop(job.id, None)
        log.getChild(record.name).info("arrived from %s; running here", job.detail["source"])
        return self._outcome(job)

    async def status(self, call: Call[NoBody]) -> wire.IncomingOutcome:
        return self._outcome(self._incoming(call.params["id"], call.caller))

    async def abort(self, call: Call[NoBody]) -> wire.IncomingOutcome:
        """Called off by the source; waits for the move's call under way here, if any."""
        job_id = call.params["id"]
        async with self._turn(job_id):
            if self.jobs.find(job_id) is None:  # its prepare has not come (yet): refuse it
                _only_hosts(call.caller, call.params)
                self._turns.pop(job_id, None)
                self._called_off[job_id] = call.caller.common_name
                while len(self._called_off) > CALLED_OFF_KEPT:
                    del self._called_off[next(iter(self._called_off))]
                return wire.IncomingOutcome(state=IncomingState.ABORTED)
            job = self._incoming(job_id, call.caller)
            # A finish under way holds the VM's lock: wait for it, so an abort
            # never removes a VM that resumed here (it then answers done).
            async with self.vms.lock(job.vm_uuid):
                await self.abort_incoming(job, "the source called the move off")
        return wire.IncomingOutcome(state=IncomingState(job.state))

    # -- endings --------------------------------------------------------------------

    async def _qemu_exited(self, job: Job) -> None:
        words = self.vms.last_words(job.vm_uuid)
        reason = "the incoming QEMU exited"
        await self.abort_incoming(job, f"{reason}: {words}" if words else
                                  f"{reason} (the stream broke or was refused)")  # fmt: skip

    def resumed(self, job: Job) -> None:
        """The VM was found running here after a restart: the move arrived."""
        self._step(job, IncomingOp.RESUME)
        # Re-attaching saw it running already; this only confirms what QEMU says.
        self.vms.apply(job.vm_uuid, VmOp.OBSERVED_RUNNING)

    async def abort_incoming(self, job: Job, reason: str) -> None:
        """Remove every trace of a VM that did not arrive (shared disks stay)."""
        if incoming_ended(IncomingState(job.state)):
            return
        self._step(job, IncomingOp.ABORT, error=reason)
        self._turns.pop(job.id, None)
        record = self.vms.catalog.find(job.vm_uuid)
        shared = job.detail.get("storage") == Storage.SHARED
        if record is not None:
            await self.vms.forget(record, keep_disks=shared)
        else:
            await asyncio.to_thread(shutil.rmtree, self.vms.vm_dir(job.vm_uuid), True)
        if job.detail.get("files_dir"):  # a copy into a cluster volume: its own dir there
            await asyncio.to_thread(shutil.rmtree, job.detail["files_dir"], True)
        log.getChild(job.vm_name).warning("incoming move %s aborted: %s", job.id, reason)


async def _write(target: Path, chunks: AsyncIterator[bytes]) -> None:
    with target.open("wb") as out:
        async for chunk in chunks:
            out.write(chunk)
