"""Live migration between hosts: the source's move job and the destination's side.

The QMP sequence is DESIGN.md section 4's (shared-nothing in libvirt's
order); the phases and the one-running-copy rule are in
:mod:`ferry.core.migration`. The source drives; the destination answers peer
calls (``/v1/peer/migrations/...``) authenticated by the source's host
certificate, whose DN also becomes QEMU's ``tls-authz`` identity, so only
that host's QEMU may feed the destination.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from ferry.adapters import qemu_img
from ferry.adapters.catalog import VmRecord
from ferry.adapters.pki import CertInfo, Role, client_ssl_context, qemu_dn
from ferry.adapters.qemu import EventWaiter, QmpChannel
from ferry.client.agent_client import AgentClient
from ferry.core import vmstate
from ferry.core.migration import (
    IncomingState,
    Phase,
    Storage,
    advance,
    cancellable,
    choose_storage,
    is_final,
    locate_on_volume,
)
from ferry.core.spec import DiskSpec, VmSpec, check_resources
from ferry.core.tasks import cancel_and_wait
from ferry.core.versions import check_host_runs
from ferry.core.vmstate import QemuStatus, VmOp, VmState
from ferry.errors import (
    AuthError,
    ConflictError,
    ConnectionFailedError,
    FerryError,
    InvalidInputError,
    MoveFailedError,
    StateError,
)
from ferry.host.jobs import Job, JobRegistry
from ferry.host.vms.service import VmService

log = logging.getLogger(__name__)

MOVE = "move"
INCOMING = "incoming"
POLL_S = 0.5
PEER_CHECK_S = 1.0
PEER_GRACE_S = 4.0  # the destination agent may be silent this long mid-copy
OUTCOME_WAIT_S = 60.0  # how long to learn the destination's fate after switch-over
INCOMING_SETTLE_S = 30.0  # how long the destination may take to load the last state
KERNEL_FILES = ("kernel", "initrd")


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        port: int = sock.getsockname()[1]
        return port


class MoveObserver(Protocol):
    """What else must follow a VM that moves (its replication relationship)."""

    def hold(self, vm_uuid: str) -> contextlib.AbstractAsyncContextManager[None]: ...

    async def hand_over(self, vm_uuid: str, host: str, url: str,
                        thumbprint: str | None) -> None: ...  # fmt: skip


class MigrationService:
    """Both sides of live migration on one host."""

    observer: MoveObserver | None = None

    def __init__(self, vms: VmService, jobs: JobRegistry) -> None:
        self.vms = vms
        self.jobs = jobs
        self.config = vms.config
        self._slots = asyncio.Semaphore(self.config.max_live_migrations)
        self._peer_tls = client_ssl_context(self.config.tls_dir)

    @property
    def host(self) -> str:
        return self.config.name

    def _peer(self, name: str, url: str, timeout: float = 120) -> AgentClient:
        return AgentClient(name, url, self._peer_tls, server_name=name, timeout=timeout)

    # == source side =========================================================

    def start_move(
        self,
        name: str,
        *,
        to: str,
        to_url: str,
        storage: Storage,
        max_bandwidth: int | None,
        downtime_limit_ms: int | None,
    ) -> Job:
        record = self.vms.get(name)
        if to == self.host:
            raise InvalidInputError(f"VM {name!r} already runs on host {to!r}")
        if record.state is not VmState.RUNNING:
            raise StateError(f"cannot move VM {name!r}: it is {record.state.value} "
                             "(live migration moves running VMs)")  # fmt: skip
        for job in self.jobs.all():
            if job.vm_uuid == record.uuid and job.kind == MOVE and not is_final(Phase(job.state)):
                raise ConflictError(f"VM {name!r} is already being moved (job {job.id})")
        bandwidth = self.config.migration_max_bandwidth if max_bandwidth is None else max_bandwidth
        job = self.jobs.create(
            MOVE, record.uuid, record.name, Phase.QUEUED.value,
            target=to, target_url=to_url, storage=storage.value, phase=Phase.QUEUED.value,
            max_bandwidth=bandwidth, downtime_limit_ms=downtime_limit_ms,
            progress={}, result=None, error=None,
        )  # fmt: skip
        job.task = asyncio.create_task(self._run_move(job), name=f"move-{job.id}")
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job.kind != MOVE:
            raise InvalidInputError(f"job {job_id} is the incoming side of a move; cancel it "
                                    "on the source host")  # fmt: skip
        phase = Phase(job.state)
        if is_final(phase):
            raise StateError(f"job {job_id} has already ended ({phase.value})")
        if not cancellable(phase):
            raise StateError(f"job {job_id} is {phase.value}: too late to cancel")
        if job.task is not None:
            job.task.cancel()
        return job

    def _phase(self, job: Job, phase: Phase, **detail: Any) -> None:
        new = advance(Phase(job.state), phase)
        entered = dict(job.detail.get("phase_started") or {})
        entered[new.value] = time.time()
        self.jobs.update(job, new.value, phase=new.value, phase_started=entered, **detail)
        log.getChild(job.vm_name).info("move %s: %s", job.id, new.value)

    async def _run_move(self, job: Job) -> None:
        started = time.monotonic()
        plan: dict[str, Any] = {}
        try:
            async with self._slots, self._hold(job.vm_uuid):
                self._phase(job, Phase.PREPARING)
                async with self._peer(job.detail["target"], job.detail["target_url"]) as peer:
                    await self._move(job, peer, plan, started)
                    await self._moved(job, peer.thumbprint)
        except asyncio.CancelledError:
            if not plan.get("finish_called"):
                await self._undo(job, plan, "cancelled by the admin")
            self._finish(job, Phase.CANCELLED, error="cancelled; the VM runs on "
                         f"{self.host} as before")  # fmt: skip
            raise
        except FerryError as exc:
            if not plan.get("finish_called"):
                await self._undo(job, plan, str(exc))
            self._finish(job, Phase.FAILED, error=str(exc))
        except Exception as exc:
            log.exception("move %s failed unexpectedly", job.id)
            if not plan.get("finish_called"):
                await self._undo(job, plan, str(exc))
            self._finish(job, Phase.FAILED, error=f"internal error: {type(exc).__name__}: {exc}")

    def _hold(self, vm_uuid: str) -> contextlib.AbstractAsyncContextManager[None]:
        if self.observer is None:
            return contextlib.nullcontext()
        return self.observer.hold(vm_uuid)

    async def _moved(self, job: Job, thumbprint: str | None) -> None:
        """Tell the observer (replication) that the VM now runs on the target."""
        if self.observer is None or job.state != Phase.DONE:
            return
        try:
            await self.observer.hand_over(job.vm_uuid, job.detail["target"],
                                          job.detail["target_url"], thumbprint)  # fmt: skip
        except FerryError as exc:
            log.error("move %s: VM %s moved, but its replication was not handed over: %s",
                      job.id, job.vm_name, exc)  # fmt: skip

    def _finish(self, job: Job, phase: Phase, *, error: str | None = None,
                result: dict[str, Any] | None = None) -> None:  # fmt: skip
        if is_final(Phase(job.state)):
            return
        self._phase(job, phase, error=error, result=result)

    async def _move(
        self, job: Job, peer: AgentClient, plan: dict[str, Any], started: float
    ) -> None:
        record = self.vms.get(job.vm_uuid)
        self.vms.apply(record, VmOp.MIGRATE)
        plan["record"] = record
        spec = record.spec
        volumes = self.vms.catalog.volumes()
        locations = [locate_on_volume(disk.path, volumes) for disk in spec.disks]
        plan["peer"] = peer  # from here on, a failure tells the destination to clean up
        prepared = await peer.post("/v1/peer/migrations", {
            "job_id": job.id, "spec": spec.model_dump(mode="json"),
            "storage": job.detail["storage"],
            "disk_volumes": [list(loc) if loc else None for loc in locations],
        })  # fmt: skip
        storage = Storage(prepared["storage"])
        self.jobs.update(job, storage=storage.value)
        for name in KERNEL_FILES:
            path = getattr(spec, name)
            if path:
                data = await asyncio.to_thread(Path(path).read_bytes)
                await peer.call("PUT", f"/v1/peer/migrations/{job.id}/files/{name}", data=data)
        launched = await peer.post(f"/v1/peer/migrations/{job.id}/launch")
        channel = self.vms.channel(record)
        tls = launched["tls"]
        if not tls and not self.config.insecure_migration:
            raise MoveFailedError(
                f"host {peer.name!r} offers only plain TCP for the memory and disk streams; "
                "set insecure_migration on both hosts (trusted networks only) or on neither"
            )
        tls_id = f"ferry-tls-{job.id}"
        if tls:
            await channel.execute("object-add", {
                "qom-type": "tls-creds-x509", "id": tls_id, "endpoint": "client",
                "dir": str(self.config.tls_dir), "verify-peer": True})  # fmt: skip
            plan["tls_id"] = tls_id
        await channel.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "events", "state": True},
            {"capability": "pause-before-switchover", "state": True},
            {"capability": "dirty-bitmaps", "state": True},
        ]})  # fmt: skip
        params: dict[str, Any] = {
            "tls-creds": tls_id if tls else "",
            "tls-hostname": job.detail["target"] if tls else "",
            "max-bandwidth": job.detail["max_bandwidth"],
        }
        if job.detail.get("downtime_limit_ms"):
            params["downtime-limit"] = job.detail["downtime_limit_ms"]
        await channel.execute("migrate-set-parameters", params)

        events_of_interest = ("MIGRATION", "BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED",
                              "BLOCK_JOB_ERROR")  # fmt: skip
        with channel.listen(*events_of_interest) as events:
            mirrors: list[str] = []
            plan["mirrors"] = mirrors
            plan["nbd_nodes"] = []
            if storage is Storage.COPY and spec.disks:
                self._phase(job, Phase.COPYING_DISKS)
                nbd = launched["nbd"]
                for index in range(len(spec.disks)):
                    node = f"nbd{index}-{job.id}"
                    server = {"type": "inet", "host": nbd["host"], "port": str(nbd["port"])}
                    node_args: dict[str, Any] = {
                        "driver": "nbd",
                        "node-name": node,
                        "server": server,
                        "export": f"disk{index}",
                    }
                    if tls:
                        node_args["tls-creds"] = tls_id
                        node_args["tls-hostname"] = job.detail["target"]
                    await channel.execute("blockdev-add", node_args)
                    plan["nbd_nodes"].append(node)
                    mirror = f"mirror{index}-{job.id}"
                    mirror_args: dict[str, Any] = {
                        "job-id": mirror,
                        "device": f"disk{index}",
                        "target": node,
                        "sync": "full",
                    }
                    if job.detail["max_bandwidth"]:
                        mirror_args["speed"] = job.detail["max_bandwidth"]
                    await channel.execute("blockdev-mirror", mirror_args)
                    mirrors.append(mirror)
                await self._wait_mirrors_ready(job, channel, events, peer, mirrors)

            self._phase(job, Phase.COPYING_MEMORY)
            await channel.execute("migrate", {"uri": launched["uri"]})
            plan["migrating"] = True
            await self._wait_migration(job, channel, events, peer, {"pre-switchover"})

            # Point of no return: the source is paused with its last pages unsent.
            self._phase(job, Phase.SWITCHING_OVER)
            for mirror in mirrors:
                await channel.execute("block-job-cancel", {"device": mirror})
            await self._wait_jobs_gone(channel, mirrors, events)
            await channel.execute("migrate-continue", {"state": "pre-switchover"})
            info = await self._wait_migration(job, channel, events, None, {"completed"})
            downtime_ms = int(info.get("downtime", 0))
            completed = time.monotonic()
            await self._switch_over(job, peer, record, storage, plan)
            # QEMU's downtime ends when the source sent its last page; the guest
            # runs again once the destination resumed, this much later.
            resume_ms = round((plan["resumed_at"] - completed) * 1000)
        total_s = round(time.monotonic() - started, 3)
        entered = job.detail["phase_started"]
        disk_s = (entered[Phase.COPYING_MEMORY] - entered[Phase.COPYING_DISKS]
                  if Phase.COPYING_DISKS in entered else 0.0)  # fmt: skip
        memory_s = time.time() - entered[Phase.COPYING_MEMORY]
        self._finish(job, Phase.DONE, result={"result": "ok", "host": job.detail["target"],
                     "total_s": total_s, "downtime_ms": downtime_ms,
                     "resume_ms": resume_ms,
                     "storage": storage.value, "disk_copy_s": round(disk_s, 3),
                     "memory_copy_s": round(memory_s, 3)})  # fmt: skip

    async def _peer_alive(self, job: Job, peer: AgentClient, last_ok: list[float]) -> None:
        """Fail the move once the destination agent has been silent too long."""
        if time.monotonic() - last_ok[0] < PEER_CHECK_S:
            return
        try:
            state = await asyncio.wait_for(peer.get(f"/v1/peer/migrations/{job.id}"), 2)
        except (FerryError, TimeoutError):
            if time.monotonic() - last_ok[0] > PEER_GRACE_S:
                raise MoveFailedError(
                    f"the agent of host {peer.name!r} stopped answering"
                ) from None
            return
        if state["state"] == IncomingState.ABORTED:
            raise MoveFailedError(f"host {peer.name!r} gave up receiving: {state.get('error')}")
        last_ok[0] = time.monotonic()

    async def _wait_mirrors_ready(self, job: Job, channel: QmpChannel, events: EventWaiter,
                                  peer: AgentClient, mirrors: list[str]) -> None:  # fmt: skip
        last_ok = [time.monotonic()]
        while True:
            jobs = {j["device"]: j for j in await channel.execute("query-block-jobs")}
            missing = [m for m in mirrors if m not in jobs]
            if missing:
                raise MoveFailedError(f"disk copy {missing[0]} to host {peer.name!r} failed")
            done = sum(jobs[m]["offset"] for m in mirrors)
            total = sum(jobs[m]["len"] for m in mirrors)
            self.jobs.update(job, progress={"disk_bytes": done, "disk_total": total})
            if all(jobs[m].get("ready") for m in mirrors):
                return
            await self._peer_alive(job, peer, last_ok)
            await events.next(POLL_S)

    async def _wait_migration(
        self,
        job: Job,
        channel: QmpChannel,
        events: EventWaiter,
        peer: AgentClient | None,
        until: set[str],
    ) -> dict[str, Any]:
        last_ok = [time.monotonic()]
        while True:
            info: dict[str, Any] = await channel.execute("query-migrate")
            status = info.get("status", "none")
            ram = info.get("ram", {})
            progress = dict(job.detail.get("progress") or {})
            progress.update({
                "status": status, "ram_bytes": ram.get("transferred", 0),
                "ram_remaining": ram.get("remaining", 0), "ram_total": ram.get("total", 0),
                "mbps": ram.get("mbps", 0), "dirty_pages_rate": ram.get("dirty-pages-rate", 0),
                "expected_downtime_ms": info.get("expected-downtime"),
            })  # fmt: skip
            self.jobs.update(job, progress=progress)
            if status in until:
                return info
            if status in ("failed", "cancelled", "none"):
                reason = info.get("error-desc") or status
                raise MoveFailedError(f"memory copy failed: {reason}")
            if peer is not None:
                await self._peer_alive(job, peer, last_ok)
            await events.next(POLL_S)  # a MIGRATION event ends the wait at once

    async def _wait_jobs_gone(self, channel: QmpChannel, mirrors: list[str],
                              events: EventWaiter | None = None,
                              timeout: float = 60) -> None:  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            present = {j["device"] for j in await channel.execute("query-block-jobs")}
            if not present & set(mirrors):
                return
            if time.monotonic() > deadline:
                raise MoveFailedError("disk copies did not finish at switch-over")
            if events is None:
                await asyncio.sleep(0.05)
            else:
                await events.next(0.05)

    async def _switch_over(self, job: Job, peer: AgentClient, record: VmRecord,
                           storage: Storage, plan: dict[str, Any]) -> None:  # fmt: skip
        """Let the destination resume; only then end the source. Never two copies."""
        plan["finish_called"] = True
        outcome, why = await self._destination_outcome(job, peer, finish=True)
        if outcome == IncomingState.DONE:
            plan["resumed_at"] = time.monotonic()
            await self.vms.forget(record, keep_disks=storage is Storage.SHARED)
            return
        # The destination does not run it: take the VM back.
        await self._undo(job, plan, f"destination could not resume: {why}")
        raise MoveFailedError(f"host {peer.name!r} could not resume the VM ({why}); it runs on "
                         f"{self.host} again")  # fmt: skip

    async def _destination_outcome(
        self, job: Job, peer: AgentClient, *, finish: bool
    ) -> tuple[str, str | None]:
        """Ask (and retry) until the destination says done or aborted, and why."""
        deadline = time.monotonic() + OUTCOME_WAIT_S
        while True:
            try:
                if finish:
                    reply = await peer.post(f"/v1/peer/migrations/{job.id}/finish")
                else:
                    reply = await peer.get(f"/v1/peer/migrations/{job.id}")
                state = str(reply["state"])
                if state in (IncomingState.DONE, IncomingState.ABORTED):
                    return state, reply.get("error")
            except ConnectionFailedError:
                finish = False  # we cannot know whether it resumed: ask, do not repeat
            except FerryError as exc:
                if exc.code == "not-found":
                    return IncomingState.ABORTED, "the destination has no such move"
                log.warning("move %s: destination says %s", job.id, exc)
                finish = False
            if time.monotonic() > deadline:
                raise MoveFailedError(
                    f"cannot learn whether host {peer.name!r} resumed VM {job.vm_name!r}; "
                    f"it stays paused on {self.host} so it never runs twice: check host "
                    f"{peer.name!r}, then 'ferry vm kill' the copy that must not run"
                )
            await asyncio.sleep(1)

    async def _undo(self, job: Job, plan: dict[str, Any], reason: str) -> None:
        """Before switch-over: keep the VM running here, clean the destination."""
        record: VmRecord | None = plan.get("record")
        if record is None:
            return
        log.getChild(record.name).warning("move %s undone: %s", job.id, reason)
        with contextlib.suppress(FerryError):
            channel = self.vms.channel(record)
            if plan.get("migrating"):
                with contextlib.suppress(FerryError):
                    await channel.execute("migrate_cancel")
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    status = (await channel.execute("query-migrate")).get("status", "none")
                    if status not in ("active", "setup", "pre-switchover", "device",
                                      "cancelling", "wait-unplug"):  # fmt: skip
                        break
                    await asyncio.sleep(0.05)
            for mirror in plan.get("mirrors", []):
                with contextlib.suppress(FerryError):
                    await channel.execute("block-job-cancel", {"device": mirror, "force": True})
            with contextlib.suppress(FerryError):
                await self._wait_jobs_gone(channel, plan.get("mirrors", []), timeout=15)
            for node in plan.get("nbd_nodes", []):
                with contextlib.suppress(FerryError):
                    await channel.execute("blockdev-del", {"node-name": node})
            if await channel.status() in (QemuStatus.PAUSED, QemuStatus.POSTMIGRATE,
                                          QemuStatus.FINISH_MIGRATE):  # fmt: skip
                await channel.execute("cont")
            status = await channel.status()
            self.vms.apply(record, vmstate.confirmed(VmOp.MIGRATE_ABORTED, status))
        peer: AgentClient | None = plan.get("peer")
        if peer is not None:
            try:
                await asyncio.wait_for(peer.post(f"/v1/peer/migrations/{job.id}/abort"), 10)
            except (FerryError, TimeoutError) as exc:
                # It cleans itself when its agent is back (see recover()).
                log.warning("move %s: could not tell %s to clean up: %s", job.id, peer.name, exc)

    async def shutdown(self) -> None:
        """Agent stopping: undo moves under way (the VMs stay here), then return."""
        running = [job.task for job in self.jobs.all()
                   if job.task is not None and not job.task.done()]  # fmt: skip
        await cancel_and_wait(*running)

    def is_incoming(self, uuid: str) -> bool:
        """True while a VM is arriving here and still runs on its source."""
        return any(job.kind == INCOMING and job.state == IncomingState.RECEIVING
                   and job.vm_uuid == uuid for job in self.jobs.all())  # fmt: skip

    # == destination side ====================================================

    def _incoming(self, job_id: str, caller: CertInfo) -> Job:
        job = self.jobs.get(job_id)
        if job.kind != INCOMING or job.detail.get("source") != caller.common_name:
            raise AuthError(f"job {job_id} is not an incoming move from {caller.common_name!r}")
        return job

    @staticmethod
    def _require_host(caller: CertInfo) -> None:
        if caller.role is not Role.HOST:
            raise AuthError("only a ferry host may send a VM here")

    async def prepare(self, caller: CertInfo, body: dict[str, Any]) -> dict[str, Any]:
        self._require_host(caller)
        spec = VmSpec.model_validate(body["spec"])
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
        for location in body.get("disk_volumes") or []:
            if location is None or location[0] not in volumes:
                break
            path = Path(volumes[location[0]]) / location[1]
            if not path.is_file():
                break
            shared_paths.append(str(path))
        visible = bool(spec.disks) and len(shared_paths) == len(spec.disks)
        storage = choose_storage(Storage(body["storage"]), visible=visible,
                                 vm=spec.name, host=self.host)  # fmt: skip

        job = self.jobs.adopt(body["job_id"], INCOMING, spec.uuid, spec.name,
                              IncomingState.RECEIVING.value, source=caller.common_name,
                              source_dn=qemu_dn(caller), storage=storage.value)  # fmt: skip
        vm_dir = self.vms.vm_dir(spec.uuid)
        try:
            vm_dir.mkdir(parents=True, exist_ok=True)
            disks = []
            for index, disk in enumerate(spec.disks):
                if storage is Storage.SHARED:
                    disks.append(disk.model_copy(update={"path": shared_paths[index]}))
                else:
                    path = vm_dir / f"disk{index}.qcow2"
                    await qemu_img.create(path, disk.size, qemu_img=self.config.qemu_img)
                    disks.append(DiskSpec(path=str(path), size=disk.size, format="qcow2"))
            local = spec.model_copy(update={
                "disks": tuple(disks),
                "kernel": str(vm_dir / "kernel") if spec.kernel else None,
                "initrd": str(vm_dir / "initrd") if spec.initrd else None,
            })  # fmt: skip
            self.vms.catalog.add_vm(local, VmState.MIGRATING)
        except BaseException as exc:
            await self._abort_incoming(job, f"prepare failed: {exc}")
            raise
        return {"storage": storage.value}

    async def receive_file(self, caller: CertInfo, job_id: str, name: str,
                           request: web.Request) -> dict[str, Any]:  # fmt: skip
        job = self._incoming(job_id, caller)
        if name not in KERNEL_FILES:
            raise InvalidInputError(f"unknown VM file {name!r}")
        target = self.vms.vm_dir(job.vm_uuid) / name
        with target.open("wb") as out:
            async for chunk in request.content.iter_chunked(1 << 20):
                out.write(chunk)
        return {"received": name}

    async def launch(self, caller: CertInfo, job_id: str) -> dict[str, Any]:
        job = self._incoming(job_id, caller)
        record = self.vms.get(job.vm_uuid)
        address = self.config.address[0]
        tls = not self.config.insecure_migration
        try:
            self.vms.exit_hooks[record.uuid] = lambda: self._incoming_qemu_exited(job)
            await self.vms.launch_incoming(record)
            channel = self.vms.channel(record)
            await channel.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "events", "state": True},
                {"capability": "dirty-bitmaps", "state": True},
            ]})  # fmt: skip
            tls_id, authz_id = f"ferry-tls-{job.id}", f"ferry-authz-{job.id}"
            if tls:
                await channel.execute("object-add", {
                    "qom-type": "tls-creds-x509", "id": tls_id, "endpoint": "server",
                    "dir": str(self.config.tls_dir), "verify-peer": True})  # fmt: skip
                await channel.execute("object-add", {
                    "qom-type": "authz-simple", "id": authz_id,
                    "identity": job.detail["source_dn"]})  # fmt: skip
            nbd = None
            if job.detail["storage"] == Storage.COPY and record.spec.disks:
                port = _free_port(address)
                args: dict[str, Any] = {"addr": {"type": "inet", "data": {
                    "host": address, "port": str(port)}}}  # fmt: skip
                if tls:
                    args.update({"tls-creds": tls_id, "tls-authz": authz_id})
                await channel.execute("nbd-server-start", args)
                for index in range(len(record.spec.disks)):
                    await channel.execute("block-export-add", {
                        "type": "nbd", "id": f"export{index}", "node-name": f"disk{index}",
                        "name": f"disk{index}", "writable": True})  # fmt: skip
                nbd = {"host": address, "port": port}
            if tls:
                await channel.execute("migrate-set-parameters",
                                      {"tls-creds": tls_id, "tls-authz": authz_id})  # fmt: skip
            port = _free_port(address)
            await channel.execute("migrate-incoming", {"uri": f"tcp:{address}:{port}"})
        except BaseException as exc:
            await self._abort_incoming(job, f"launch failed: {exc}")
            raise
        return {"uri": f"tcp:{address}:{port}", "nbd": nbd, "tls": tls}

    async def finish(self, caller: CertInfo, job_id: str) -> dict[str, Any]:
        """Switch-over: resume here. Idempotent: a repeated call reports the outcome."""
        job = self._incoming(job_id, caller)
        if job.state != IncomingState.RECEIVING:
            return {"state": job.state, "error": job.detail.get("error")}
        record = self.vms.get(job.vm_uuid)
        async with self.vms.lock(record.uuid):
            try:
                channel = self.vms.channel(record)
                status = await self._incoming_settled(channel)
                if status != "completed":
                    raise MoveFailedError(f"the incoming migration is {status}, not completed")
                if job.detail["storage"] == Storage.COPY and record.spec.disks:
                    await channel.execute("nbd-server-stop")
                self.vms.exit_hooks.pop(record.uuid, None)
                await channel.execute("cont")
                self.vms.apply(record, VmOp.ARRIVED)
            except FerryError as exc:
                words = self.vms.last_words(record.uuid)
                reason = f"{exc} (QEMU said: {words})" if words else str(exc)
                await self._abort_incoming(job, reason)
                return {"state": job.state, "error": reason}
            self.jobs.update(job, IncomingState.DONE.value)
        log.getChild(record.name).info("arrived from %s; running here", job.detail["source"])
        return {"state": job.state}

    @staticmethod
    async def _incoming_settled(channel: QmpChannel) -> str:
        """Wait until the incoming side has loaded the whole stream; its status.

        The source reports ``completed`` once it has sent its last byte; this
        side is still loading device state and activating its images then
        (longer with every disk), so it must be asked, not assumed, to be done.
        """
        deadline = time.monotonic() + INCOMING_SETTLE_S
        with channel.listen("MIGRATION") as events:
            while True:
                status = str((await channel.execute("query-migrate")).get("status", "none"))
                if status not in ("active", "setup", "device") or time.monotonic() > deadline:
                    return status
                await events.next(0.05)

    def incoming_status(self, caller: CertInfo, job_id: str) -> dict[str, Any]:
        job = self._incoming(job_id, caller)
        return {"state": job.state, "error": job.detail.get("error")}

    async def abort(self, caller: CertInfo, job_id: str) -> dict[str, Any]:
        job = self._incoming(job_id, caller)
        if job.state == IncomingState.RECEIVING:
            await self._abort_incoming(job, "the source called the move off")
        return {"state": job.state}

    async def _incoming_qemu_exited(self, job: Job) -> None:
        words = self.vms.last_words(job.vm_uuid)
        reason = "the incoming QEMU exited"
        await self._abort_incoming(job, f"{reason}: {words}" if words else
                                   f"{reason} (the stream broke or was refused)")  # fmt: skip

    async def _abort_incoming(self, job: Job, reason: str) -> None:
        """Remove every trace of a VM that did not arrive (shared disks stay)."""
        if job.state != IncomingState.RECEIVING:
            return
        self.jobs.update(job, IncomingState.ABORTED.value, error=reason)
        record = self.vms.catalog.find(job.vm_uuid)
        shared = job.detail.get("storage") == Storage.SHARED
        if record is not None:
            await self.vms.forget(record, keep_disks=shared)
        else:
            await asyncio.to_thread(shutil.rmtree, self.vms.vm_dir(job.vm_uuid), True)
        log.getChild(job.vm_name).warning("incoming move %s aborted: %s", job.id, reason)

    # == after a restart =====================================================

    async def recover(self) -> None:
        """Finish or undo every move that was under way when the agent stopped."""
        for job in self.jobs.all():
            if job.kind == INCOMING and job.state == IncomingState.RECEIVING:
                record = self.vms.catalog.find(job.vm_uuid)
                status: QemuStatus | None = None
                if record is not None:
                    with contextlib.suppress(FerryError):
                        status = await self.vms.channel(record).status()
                if status is QemuStatus.RUNNING:  # resumed just before the agent stopped
                    self.jobs.update(job, IncomingState.DONE.value)
                    # re-attaching found it running already; this records nothing new
                    self.vms.apply(job.vm_uuid, vmstate.observed(status))
                else:
                    await self._abort_incoming(job, "the agent restarted during the move")
            elif job.kind == MOVE and not is_final(Phase(job.state)):
                await self._recover_move(job)

    async def _recover_move(self, job: Job) -> None:
        record = self.vms.catalog.find(job.vm_uuid)
        if record is None:
            self._finish(job, Phase.DONE if job.state == Phase.SWITCHING_OVER else Phase.FAILED,
                         error=None)  # fmt: skip
            return
        plan: dict[str, Any] = {"record": record, "migrating": True,
                                "mirrors": [], "nbd_nodes": []}  # fmt: skip
        try:
            channel = self.vms.channel(record)
            plan["mirrors"] = [j["device"] for j in await channel.execute("query-block-jobs")
                               if j["device"].endswith(job.id)]  # fmt: skip
            plan["nbd_nodes"] = [f"nbd{i}-{job.id}" for i in range(len(record.spec.disks))]
            status = (await channel.execute("query-migrate")).get("status")
        except FerryError:
            status = None
        async with self._peer(job.detail["target"], job.detail["target_url"], 15) as peer:
            plan["peer"] = peer
            if status == "completed":
                outcome: str = IncomingState.ABORTED
                with contextlib.suppress(FerryError):
                    outcome, _ = await self._destination_outcome(job, peer, finish=False)
                if outcome == IncomingState.DONE:
                    storage = Storage(job.detail["storage"])
                    await self.vms.forget(record, keep_disks=storage is Storage.SHARED)
                    self._finish(job, Phase.DONE, result={"result": "ok",
                                 "host": job.detail["target"]})  # fmt: skip
                    return
            await self._undo(job, plan, "the agent restarted during the move")
        if Phase(job.state) is Phase.SWITCHING_OVER:
            self.jobs.update(job, Phase.FAILED.value, phase=Phase.FAILED.value,
                             error="the agent restarted during the switch-over; the VM "
                             f"stays on {self.host}")  # fmt: skip
        else:
            self._finish(job, Phase.FAILED, error="the agent restarted during the move; "
                         f"the VM stays on {self.host}")  # fmt: skip
