"""The agent's HTTPS API (aiohttp): the app, host, VM, job and volume routes.

Authentication and the error edge are :mod:`ferry.api.edge`; replication and
failover routes :mod:`ferry.api.protection`; peer routes come from the
services through the typed peer layer (:mod:`ferry.peer.server`). Payloads
are in :mod:`ferry.api.models`.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from ferry import __version__
from ferry.adapters.catalog import VmRecord
from ferry.api.adopt import AdoptionRoutes
from ferry.api.cluster_moves import move_to_cluster
from ferry.api.cluster_vms import ClusterVmRoutes
from ferry.api.edge import guard
from ferry.api.edge import json_reply as _json
from ferry.api.edge import read_body as _body
from ferry.api.models import (
    ConsoleChunk,
    CreateVmRequest,
    DiskView,
    ExportRequest,
    HostView,
    ImportRequest,
    MoveRequest,
    NetworkRequest,
    NetworkView,
    NicRequest,
    NicView,
    StopRequest,
    StopResult,
    VmView,
    VolumeRequest,
)
from ferry.api.protection import ProtectionRoutes
from ferry.api.vnc import VncRoutes
from ferry.core import vmstate
from ferry.core.cluster.roles import Want, parse_priority
from ferry.core.cpu_models import effective_model
from ferry.core.migration import Storage
from ferry.core.network import (
    TEST_GUEST_MARK,
    NicOption,
    check_network_map,
    guest_ip_of,
    parse_mac,
)
from ferry.core.relationship import Role as RelRole
from ferry.core.spec import VmSpec
from ferry.core.versions import supported_range
from ferry.core.vmstate import VmState
from ferry.errors import FerryError, InvalidInputError, StoreUnavailableError
from ferry.host import facts
from ferry.host.adopt import AdoptionService
from ferry.host.cluster.crossing import ClusterCrossing
from ferry.host.cluster.maintenance import Maintenance
from ferry.host.cluster.vms import ClusterVms, RemoteVm
from ferry.host.exchange.service import ExchangeService
from ferry.host.failover.service import FailoverService
from ferry.host.migration.service import MigrationService
from ferry.host.replication.extension import ExtensionService
from ferry.host.replication.primary import ReplicationService
from ferry.host.replication.receiver import ReplicaStore
from ferry.host.vms.requests import NewDisk, NewVm
from ferry.host.vms.service import VmService
from ferry.peer.server import PeerServer

log = logging.getLogger(__name__)


def _nic_option(nic: NicRequest) -> NicOption:
    return NicOption(network=nic.network, mac=parse_mac(nic.mac) if nic.mac else None,
                     model=nic.model)  # fmt: skip


def nic_views(spec: VmSpec) -> list[NicView]:
    """The VM's NICs; a test guest's with the address it takes from its MAC."""
    test_guest = TEST_GUEST_MARK in (spec.append or "").split()
    return [NicView(network=n.network, mac=n.mac, model=n.model,
                    ip=guest_ip_of(n.mac) if test_guest else None)
            for n in spec.nics]  # fmt: skip


def _disk_views(spec: VmSpec) -> list[DiskView]:
    return [DiskView(path=d.path, size=d.size, format=d.format, firmware=i == spec.vars_disk)
            for i, d in enumerate(spec.disks)]  # fmt: skip


class AgentApi:
    """Route handlers over one host's services."""

    def __init__(
        self,
        vms: VmService,
        migrations: MigrationService,
        exchange: ExchangeService,
        replication: ReplicationService,
        extensions: ExtensionService,
        *,
        url: str,
        accelerator: str,
        qemu_version: str,
        peer_server: PeerServer,
        failover: FailoverService,
        cluster_vms: ClusterVms | None = None,
        maintenance: Maintenance | None = None,
        adoption: AdoptionService | None = None,
    ) -> None:
        self.vms = vms
        self.migrations = migrations
        self.exchange = exchange
        self.replication = replication
        self.extensions = extensions
        self.failover = failover
        self.replicas: ReplicaStore = replication.store
        self.replica_server = replication.store.server
        self.jobs = migrations.jobs
        self.url = url
        self.accelerator = accelerator
        self.qemu_version = qemu_version
        self.peer_server = peer_server
        self.cluster_vms = cluster_vms
        self.maintenance = maintenance
        self.adoption = adoption
        self.crossing: ClusterCrossing | None = None  # vm move --to-cluster (set by the agent)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[guard], client_max_size=1024**2)
        app.add_routes(
            [
                web.get("/v1/host", self.host),
                web.get("/v1/vms", self.list_vms),
                web.post("/v1/vms", self.create_vm),
                web.get("/v1/vms/{name}", self.show_vm),
                web.post("/v1/vms/{name}/start", self.start_vm),
                web.post("/v1/vms/{name}/stop", self.stop_vm),
                web.post("/v1/vms/{name}/kill", self.kill_vm),
                web.post("/v1/vms/{name}/pause", self.pause_vm),
                web.post("/v1/vms/{name}/resume", self.resume_vm),
                web.delete("/v1/vms/{name}", self.delete_vm),
                web.get("/v1/vms/{name}/console", self.console),
                web.post("/v1/vms/{name}/move", self.move_vm),
                web.post("/v1/vms/{name}/upgrade-version", self.upgrade_version),
                web.post("/v1/vms/{name}/export", self.export_vm),
                web.post("/v1/imports", self.import_vm),
                web.post("/v1/vms/{name}/refresh", self.refresh_vm),
                web.post("/v1/host/refresh-vms", self.refresh_vms),
                web.get("/v1/host/upgrade-check", self.upgrade_check),
                web.get("/v1/jobs", self.list_jobs),
                web.get("/v1/jobs/{id}", self.show_job),
                web.post("/v1/jobs/{id}/cancel", self.cancel_job),
                web.get("/v1/networks", self.list_networks),
                web.post("/v1/networks", self.add_network),
                web.delete("/v1/networks/{name}", self.remove_network),
                web.get("/v1/volumes", self.list_volumes),
                web.post("/v1/volumes", self.add_volume),
                web.delete("/v1/volumes/{name}", self.remove_volume),
            ]
        )
        app.add_routes(
            ProtectionRoutes(self.vms, self.replication, self.extensions, self.failover).routes()
        )
        app.add_routes(VncRoutes(self.vms).routes())
        if self.adoption is not None:
            app.add_routes(AdoptionRoutes(self.adoption).routes())
        if self.cluster_vms is not None and self.maintenance is not None:
            app.add_routes(ClusterVmRoutes(self.cluster_vms, self.maintenance, view=self._view,
                                           host=self.vms.config.name).routes())  # fmt: skip
        # Peer endpoints that services registered with the typed peer layer.
        app.add_routes(self.peer_server.aiohttp_routes(lambda request: request["caller"]))
        return app

    def _view(self, record: VmRecord) -> VmView:
        spec = record.spec
        return VmView(
            name=spec.name,
            uuid=spec.uuid,
            host=self.vms.config.name,
            state=record.state.value,
            config_version=spec.config_version,
            memory=spec.memory,
            cpus=spec.cpus,
            disks=_disk_views(spec),
            kernel=spec.kernel,
            append=spec.append,
            pid=self.vms.pid_of(spec.uuid),
            incoming=self.migrations.is_incoming(spec.uuid),
            busy=self.vms.turns.holder(spec.uuid),
            replication=self._replication_summary(spec.uuid),
            cluster=self.cluster_vms.cluster_of(spec.uuid) if self.cluster_vms else None,
            display=spec.display,
            vnc=spec.display == "vnc",
            nics=nic_views(spec),
            guest_agent=spec.guest_agent,
            cpu_model=effective_model(spec.cpu_model),
            firmware=spec.firmware,
            boot_disk=spec.boot_disk,
        )

    def _replication_summary(self, vm_uuid: str) -> dict[str, object] | None:
        rel = self.vms.catalog.relationship(vm_uuid)
        if rel is None:
            return None
        extended = rel.role is RelRole.REPLICA  # only a replica host extends
        ext = self.vms.catalog.extension(vm_uuid) if extended else None
        return {"role": rel.role.value, "state": rel.state.value, "primary": rel.primary,
                "replica": rel.replica, "frequency_s": rel.frequency_s,
                "origin": rel.origin or None,
                "extended": None if ext is None else ext.host}  # fmt: skip

    async def host(self, request: web.Request) -> web.Response:
        config = self.vms.config
        records = self.vms.list()
        view = HostView(
            name=config.name,
            url=self.url,
            version=__version__,
            functional_level=config.functional_level,
            supported_config_versions=supported_range(config.functional_level),
            accelerator=self.accelerator,
            qemu_version=self.qemu_version,
            memory=self.vms.host_memory,
            cpus=self.vms.host_cpus,
            vms=len(records),
            running_vms=sum(r.state == VmState.RUNNING for r in records),
            data_dir=str(config.data_dir),
            schema_version=self.vms.catalog.schema_version,
            networks=await self._networks(),
            cpu_models=list(self.vms.cpu.models),
            firmware=["bios", "uefi"] if self.vms.processes.uefi() else ["bios"],
        )
        return _json(view)

    async def list_vms(self, request: web.Request) -> web.Response:
        return _json([self._view(r).model_dump() for r in self.vms.list()])

    async def create_vm(self, request: web.Request) -> web.Response:
        create = await _body(request, CreateVmRequest)
        new = NewVm(
            **create.model_dump(exclude={"disks", "cluster", "priority", "node", "nics"}),
            disks=tuple(NewDisk(size=d.size, image=d.image) for d in create.disks),
            nics=tuple(_nic_option(n) for n in create.nics),
        )
        if create.cluster is None:
            return _json(self._view(await self.vms.create(new)), status=201)
        record, owner = await self._cluster_vms().create(
            new, cluster=create.cluster, priority=parse_priority(create.priority),
            host=create.node)  # fmt: skip
        view = self._view(record).model_copy(update={"host": owner, "cluster": create.cluster})
        return _json(view, status=201)

    def _cluster_vms(self) -> ClusterVms:
        if self.cluster_vms is None:
            raise InvalidInputError(f"host {self.vms.config.name!r} cannot run clustered VMs")
        return self.cluster_vms

    async def show_vm(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        remote = await self._remote(name)
        if remote is not None:
            return _json(self._remote_view(remote))
        if self.cluster_vms is not None and self.vms.catalog.find(name) is None:
            await self.cluster_vms.check_copied(name)  # copy-roles gave it away
        return _json(self._view(self.vms.get(name)))

    async def _remote(self, name: str) -> RemoteVm | None:
        """A clustered VM that another node owns (this node has no entry of it), or None."""
        if self.cluster_vms is None or self.vms.catalog.find(name) is not None:
            return None
        try:
            return await self.cluster_vms.remote(name)
        except StoreUnavailableError as exc:  # the local answer ("no VM named ...") stands
            log.info("VM %s: the cluster's store did not answer: %s", name, exc)
            return None

    def _remote_view(self, remote: RemoteVm) -> VmView:
        spec = remote.role.spec
        return VmView(
            name=spec.name, uuid=spec.uuid, host=remote.owner.node if remote.owner else "",
            state=remote.state, config_version=spec.config_version, memory=spec.memory,
            cpus=spec.cpus, kernel=spec.kernel, append=spec.append, cluster=remote.cluster,
            display=spec.display, vnc=spec.display == "vnc", guest_agent=spec.guest_agent,
            cpu_model=effective_model(spec.cpu_model), firmware=spec.firmware,
            boot_disk=spec.boot_disk, disks=_disk_views(spec), nics=nic_views(spec),
        )  # fmt: skip

    async def _want_remote(self, remote: RemoteVm, want: Want) -> web.Response:
        """Start or stop from a node that does not own the VM: the owner acts (202)."""
        assert self.cluster_vms is not None
        remote = await self.cluster_vms.want_remote(remote, want)
        view = self._remote_view(remote).model_dump()
        return _json({**view, "want": want.value, "owner_acts": True}, status=202)

    async def start_vm(self, request: web.Request) -> web.Response:
        remote = await self._remote(request.match_info["name"])
        if remote is not None:
            return await self._want_remote(remote, Want.RUNNING)
        if self.cluster_vms is not None:  # a clustered VM: on its owner, then want running
            await self.cluster_vms.before_start(request.match_info["name"])
        record = await self.vms.start(request.match_info["name"])
        if self.cluster_vms is not None:
            await self.cluster_vms.after_start(record)
        return _json(self._view(record))

    async def stop_vm(self, request: web.Request) -> web.Response:
        stop = await _body(request, StopRequest)
        remote = await self._remote(request.match_info["name"])
        if remote is not None:
            return await self._want_remote(remote, Want.OFF)
        if self.cluster_vms is not None:  # a clustered VM stays off (want off)
            await self.cluster_vms.before_stop(request.match_info["name"])
        record, forced = await self.vms.stop(request.match_info["name"], timeout=stop.timeout_s)
        return _json(StopResult(vm=self._view(record), forced=forced))

    async def kill_vm(self, request: web.Request) -> web.Response:
        if self.cluster_vms is not None:
            await self.cluster_vms.before_stop(request.match_info["name"])
        return _json(self._view(await self.vms.kill(request.match_info["name"])))

    async def pause_vm(self, request: web.Request) -> web.Response:
        return _json(self._view(await self.vms.pause(request.match_info["name"])))

    async def resume_vm(self, request: web.Request) -> web.Response:
        record = await self.vms.pause(request.match_info["name"], resume=True)
        return _json(self._view(record))

    async def delete_vm(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        force = request.query.get("force", "0") in ("1", "true", "yes")
        if self.cluster_vms is None or not await self.cluster_vms.delete(name, force=force):
            await self.vms.delete(name, force=force)
        return _json({"deleted": name})

    async def console(self, request: web.Request) -> web.Response:
        try:
            offset = max(0, int(request.query.get("offset", "0")))
        except ValueError:
            raise InvalidInputError("offset must be a whole number of bytes") from None
        text, new_offset = self.vms.console(request.match_info["name"], offset)
        return _json(ConsoleChunk(text=text, offset=new_offset))

    async def move_vm(self, request: web.Request) -> web.Response:
        move = await _body(request, MoveRequest)
        if move.to_cluster is not None or not move.to:  # into another cluster
            job = await move_to_cluster(self.crossing, self.migrations,
                                        request.match_info["name"], move)  # fmt: skip
            return _json(job.view(self.vms.config.name), status=202)
        storage = Storage(move.storage)
        if self.cluster_vms is not None:  # inside its cluster, on the shared volume
            storage = await self.cluster_vms.check_move(request.match_info["name"], move.to,
                                                        storage)  # fmt: skip
        network_map = check_network_map(move.network_map)
        await self.migrations.preflight(request.match_info["name"], to=move.to,
                                        to_url=move.to_url, network_map=network_map)  # fmt: skip
        job = self.migrations.start_move(
            request.match_info["name"],
            to=move.to,
            to_url=move.to_url,
            storage=storage,
            max_bandwidth=move.max_bandwidth,
            downtime_limit_ms=move.downtime_limit_ms,
            network_map=network_map,
            postcopy=move.postcopy,
        )
        return _json(job.view(self.vms.config.name), status=202)

    async def upgrade_version(self, request: web.Request) -> web.Response:
        record = await self.vms.upgrade_version(request.match_info["name"])
        if self.cluster_vms is not None:  # a clustered VM restarts elsewhere at that version
            await self.cluster_vms.after_upgrade(record)
        return _json(self._view(record))

    async def list_jobs(self, request: web.Request) -> web.Response:
        return _json([job.view(self.vms.config.name) for job in self.jobs.all()])

    async def show_job(self, request: web.Request) -> web.Response:
        return _json(self.jobs.get(request.match_info["id"]).view(self.vms.config.name))

    async def cancel_job(self, request: web.Request) -> web.Response:
        """The job's kind decides what cancelling means (handlers registered by kind)."""
        job = self.jobs.cancel(request.match_info["id"])
        return _json(job.view(self.vms.config.name))

    async def export_vm(self, request: web.Request) -> web.Response:
        export = await _body(request, ExportRequest)
        job = self.exchange.start_export(
            request.match_info["name"],
            export.to,
            live=export.live,
            max_bandwidth=export.max_bandwidth,
        )
        return _json(job.view(self.vms.config.name), status=202)

    async def import_vm(self, request: web.Request) -> web.Response:
        body = await _body(request, ImportRequest)
        job = await self.exchange.start_import(
            body.folder, mode=body.mode, new_name=body.name, cluster=body.cluster,
            volume=body.volume, network_map=check_network_map(body.network_map))  # fmt: skip
        return _json(job.view(self.vms.config.name), status=202)

    async def refresh_vm(self, request: web.Request) -> web.Response:
        """One running VM into a fresh QEMU on this host (vm refresh, plan apply in place)."""
        name = request.match_info["name"]
        async with self.vms.turns.turn(self.vms.get(name).uuid, "a refresh"):
            return _json(await self.vms.refresh_process(name))

    async def refresh_vms(self, request: web.Request) -> web.Response:
        results = []
        for record in self.vms.list():
            if record.state is VmState.RUNNING:
                try:
                    async with self.vms.turns.turn(record.uuid, "refresh-vms"):
                        results.append(await self.vms.refresh_process(record.name))
                except FerryError as exc:
                    results.append({"vm": record.name, "error": str(exc)})
        return _json({"host": self.vms.config.name, "results": results})

    async def upgrade_check(self, request: web.Request) -> web.Response:
        records = self.vms.list()
        installed = await asyncio.to_thread(facts.qemu_version, self.vms.config.qemu_binary)
        return _json({
            "host": self.vms.config.name,
            "version": __version__,
            "schema_version": self.vms.catalog.schema_version,
            "running_vms": [r.name for r in records if vmstate.is_live(r.state)],
            "outdated_qemu_vms": self.vms.outdated_binaries(),
            "qemu_version": self.qemu_version,
            "installed_qemu_version": installed,
        })  # fmt: skip

    async def _networks(self) -> list[NetworkView]:
        rows = await self.vms.networks.views()
        return [NetworkView.model_validate(row) for row in rows]

    async def list_networks(self, request: web.Request) -> web.Response:
        return _json([n.model_dump() for n in await self._networks()])

    async def add_network(self, request: web.Request) -> web.Response:
        body = await _body(request, NetworkRequest)
        await self.vms.networks.add(body.name, body.bridge, body.netns)
        view = next(n for n in await self._networks() if n.name == body.name)
        return _json(view, status=201)

    async def remove_network(self, request: web.Request) -> web.Response:
        self.vms.networks.remove(request.match_info["name"])
        return _json([n.model_dump() for n in await self._networks()])

    async def list_volumes(self, request: web.Request) -> web.Response:
        return _json(self.vms.catalog.volumes())

    async def add_volume(self, request: web.Request) -> web.Response:
        volume = await _body(request, VolumeRequest)
        return _json(self.vms.add_volume(volume.name, volume.path), status=201)

    async def remove_volume(self, request: web.Request) -> web.Response:
        self.vms.catalog.remove_volume(request.match_info["name"])
        return _json(self.vms.catalog.volumes())
