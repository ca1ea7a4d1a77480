"""The replica side of replication: accept a VM, take its recovery points, end it.

A primary host offers a VM (``POST /v1/peer/replicas``); once the replica
server admits the primary, this records the VM as a stopped ``replica`` VM and
a :class:`~ferry.core.relationship.Relationship` pinning the primary's
certificate. Every recovery point then arrives as a delta stream
(:mod:`ferry.adapters.point_transfer`), is written next to the chain and
linked onto it (:mod:`ferry.host.replication.chain`); retention follows. Every
call about a replica comes from its pinned primary
(:func:`ferry.core.replication.check_partner`), checked before anything
changes; for a clustered VM a host of the primary's cluster may also claim
the primary's place (:meth:`ReplicaStore.update`,
:func:`ferry.core.replication.check_primary_change`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Protocol
from uuid import UUID

from ferry import __version__
from ferry.adapters.catalog import Catalog, VmRecord
from ferry.adapters.durable import fsync_file
from ferry.adapters.firmware import check_firmware_here
from ferry.adapters.os_errors import free_mib, os_errors
from ferry.adapters.pki import CertInfo, Role
from ferry.adapters.point_transfer import PointReceiver, receive_point
from ferry.core.cpu_models import CpuFacts, check_cpu
from ferry.core.network import (
    apply_network_map,
    check_network_map,
    check_networks,
    missing_networks,
)
from ferry.core.relationship import InitialMethod, Relationship
from ferry.core.relationship import Role as RelRole
from ferry.core.replica_server import Admission
from ferry.core.replication import (
    Caller,
    PointInfo,
    ReplicationState,
    check_frequency,
    check_partner,
    check_primary_change,
    check_primary_or_cluster,
    check_recovery_points,
    check_replica_accepts,
    format_frequency,
    is_continuous,
)
from ferry.core.spec import NicSpec, VmSpec
from ferry.core.versions import check_host_runs
from ferry.core.vmstate import VmOp, VmState
from ferry.errors import (
    AuthError,
    ConflictError,
    FerryError,
    InvalidInputError,
    NotFoundError,
    StateError,
    StorageFullError,
)
from ferry.host.config import HostConfig
from ferry.host.networks import HostNetworks, Links
from ferry.host.replication.chain import (
    ADOPTED_POINT,
    BASE,
    RecoveryPointChain,
    disk_file,
    replica_spec,
)
from ferry.host.replication.server import ReplicaServer
from ferry.host.vms.states import VmStates
from ferry.peer.replication import (
    FileReceived,
    Offer,
    PointLinked,
    PointList,
    ReplicaChanges,
    ReplicaRemoved,
    ReplicaState,
)

log = logging.getLogger(__name__)

__all__ = ["ReplicaStore", "caller_of", "disk_file"]


class Broker(Protocol):
    """What accepting needs of the replica broker (:mod:`ferry.host.replication.broker`)."""

    async def admit(self, caller: CertInfo, offer: Offer) -> Admission: ...

    async def claim(self, cluster: str, uuid: str) -> None: ...

    async def publish(self, uuid: str, *, cluster: str | None = None) -> None: ...


def caller_of(cert: CertInfo) -> Caller:
    """A peer call's certificate, as the authorisation rules read it."""
    return Caller(
        cert.common_name,
        cert.thumbprint,
        admin=cert.role is Role.ADMIN,
        dns_names=tuple(cert.dns_names),
    )


class ReplicaStore:
    """This host's replica VMs and their recovery point chains."""

    def __init__(self, config: HostConfig, catalog: Catalog, server: ReplicaServer,
                 cpu: CpuFacts | None = None, links: Links | None = None) -> None:  # fmt: skip
        self.config = config
        self.catalog = catalog
        self.links = links  # the host's links (None: the real ones, through ip)
        # The CPU models this host runs: a replica it could never fail over is refused.
        self.cpu = cpu or CpuFacts(host=config.name)
        self.states = VmStates(catalog)  # the replica VMs' states change only through it
        self.server = server
        self.chain = RecoveryPointChain(catalog)
        # The replica broker of this node's cluster (host/replication/broker.py), if any.
        self.broker: Broker | None = None
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # Background retention (continuous replication): VM -> another run wanted.
        self._retaining: dict[str, bool] = {}
        self._retain_tasks: set[asyncio.Task[None]] = set()

    def lock(self, vm_uuid: str) -> asyncio.Lock:
        return self._locks[vm_uuid]

    async def retain(self, vm_uuid: str) -> None:
        async with self._locks[vm_uuid]:
            await self.chain.retain(self.relationship(vm_uuid))

    # -- reading ---------------------------------------------------------------

    def relationship(self, vm_uuid: str) -> Relationship:
        rel = self.catalog.relationship(vm_uuid)
        if rel is None or rel.role is not RelRole.REPLICA:
            raise NotFoundError(
                f"host {self.config.name!r} holds no replica of VM {vm_uuid}; "
                "if the replica VM moved, point the primary at its new host with "
                "'ferry replication set VM --replica HOST'"
            )
        return rel

    def replica_of(self, name: str, *, commands: str) -> tuple[VmRecord, Relationship]:
        """VM ``name`` here and its replica relationship (admin commands by name).

        ``commands`` says what must run against the replica host instead.
        """
        record = self.catalog.find(name)
        if record is None:
            raise NotFoundError(f"no VM named {name!r} on host {self.config.name!r}")
        rel = self.catalog.relationship(record.uuid)
        if rel is None or rel.role is not RelRole.REPLICA:
            raise NotFoundError(f"VM {name!r} on host {self.config.name!r} is not a replica; "
                                f"run {commands} against the replica host (--host)")  # fmt: skip
        return record, rel

    def check_primary(self, caller: CertInfo, rel: Relationship) -> None:
        """Only the relationship's pinned primary (by name and thumbprint) acts on it."""
        check_partner(caller_of(caller), vm=rel.vm_name, partner=rel.primary,
                      thumbprint=rel.thumbprint)  # fmt: skip

    def partner_relationship(self, caller: CertInfo, vm_uuid: str) -> Relationship:
        """The VM's replica relationship, if ``caller`` is its primary (else AuthError)."""
        rel = self.relationship(vm_uuid)
        self.check_primary(caller, rel)
        return rel

    def changer_relationship(self, caller: CertInfo, vm_uuid: str) -> Relationship:
        """The relationship, if ``caller`` is its primary or a host of the primary's cluster.

        The guard of a change (``PATCH``), before the body is read; what a
        cluster host may change is decided with the body, in :meth:`update`.
        """
        rel = self.relationship(vm_uuid)
        check_primary_or_cluster(caller_of(caller), vm=rel.vm_name, partner=rel.primary,
                                 thumbprint=rel.thumbprint, cluster=rel.cluster,
                                 hosts=rel.cluster_hosts)  # fmt: skip
        return rel

    def points(self, vm_uuid: str) -> list[PointInfo]:
        """Recovery points offered for failover, oldest first."""
        return self.chain.points(vm_uuid)

    def point_views(self, vm_uuid: str) -> PointList:
        return self.chain.views(vm_uuid, self.relationship(vm_uuid).app_consistent_points)

    def replica_spec(self, spec: VmSpec, storage: Path, stem: str | None) -> VmSpec:
        return replica_spec(spec, storage, stem)

    def state(self, vm_uuid: str) -> ReplicaState:
        rel = self.relationship(vm_uuid)
        chain = self.catalog.points(vm_uuid)
        points = [p for p in chain if p.id != ADOPTED_POINT]
        record = self.catalog.find(vm_uuid)
        return ReplicaState(
            vm=rel.vm_name,
            host=self.config.name,
            version=__version__,
            functional_level=self.config.functional_level,
            primary=rel.primary,
            origin=rel.origin,
            latest_point=chain[-1].id if chain else None,
            latest_time=points[-1].time if points else None,
            points=len(points),
            recovery_points=rel.recovery_points,
            bytes=sum(p.size for p in chain),
            cluster=rel.cluster,
            cluster_hosts=list(rel.cluster_hosts),
            missing_networks=missing_networks(record.spec, self.networks().all(), {})
            if record is not None
            else [],
        )

    # -- accepting a VM ----------------------------------------------------------

    async def accept(self, caller: CertInfo, offer: Offer) -> ReplicaState:
        """A primary offers VM ``offer.spec``: admit it and record the replica VM.

        A resent offer (its reply was lost) is answered as the first was, if it
        comes from the pinned primary; any other offer for a VM this host
        already has a relationship for is a conflict.
        """
        if caller.role is not Role.HOST:
            raise AuthError("only a ferry host can be a primary")
        if offer.cluster:  # the replica broker: the cluster admits, and holds the VM
            if self.broker is None:
                raise NotFoundError(f"host {self.config.name!r} is not a node of cluster "
                                    f"{offer.cluster!r}")  # fmt: skip
            admission = await self.broker.admit(caller, offer)
        else:
            admission = self.server.admit(caller.common_name)
        spec = offer.spec
        frequency = check_frequency(offer.frequency_s)
        keep = check_recovery_points(offer.recovery_points)
        initial = offer.initial
        check_replica_accepts(offer.functional_level, self.config.functional_level,
                              primary=caller.common_name, replica=self.config.name,
                              vm=spec.name)  # fmt: skip
        check_host_runs(spec.config_version, self.config.functional_level,
                        host=self.config.name, vm=spec.name)  # fmt: skip
        check_cpu(spec.cpu_model, self.cpu, vm=spec.name)
        check_firmware_here(spec.firmware, self.config.firmware_descriptors,
                            host=self.config.name, vm=spec.name)  # fmt: skip
        network_map = check_network_map(offer.network_map)
        spec = self.mapped_spec(spec, network_map)
        async with self._locks[spec.uuid]:
            existing = self.catalog.relationship(spec.uuid)
            if existing is not None:
                if existing.role is RelRole.REPLICA and existing.primary == caller.common_name:
                    self.check_primary(caller, existing)  # its pinned certificate, too
                    return self.state(spec.uuid)  # the offer's reply was lost; same primary
                raise ConflictError(
                    f"host {self.config.name!r} already has a replication relationship for "
                    f"VM {spec.name!r} (from {existing.primary!r})"
                )
            storage = Path(admission.storage) / spec.uuid
            record = self.catalog.find(spec.uuid)
            adopt = initial is InitialMethod.EXISTING
            if adopt and (record is None or record.uuid != spec.uuid):
                raise NotFoundError(
                    f"--initial existing: host {self.config.name!r} has no VM with the UUID of "
                    f"{spec.name!r} ({spec.uuid}); import or copy it there first, or use "
                    "--initial network"
                )
            if not adopt and self.catalog.find(spec.name) is not None:
                raise ConflictError(
                    f"host {self.config.name!r} already has a VM named {spec.name!r}; "
                    "use --initial existing if it is a copy of this VM"
                )
            storage.mkdir(parents=True, exist_ok=True)
            rel = Relationship(
                vm_uuid=spec.uuid, vm_name=spec.name, role=RelRole.REPLICA,
                primary=caller.common_name, replica=self.config.name,
                frequency_s=frequency, recovery_points=keep, initial=initial,
                thumbprint=caller.thumbprint, created=time.time(), storage=str(storage),
                primary_url=offer.primary_url, origin=offer.origin, origin_url=offer.origin_url,
                network_map=network_map, broker=offer.cluster,
            )  # fmt: skip
            if adopt:
                assert record is not None
                await self._adopt(record, spec, storage)
            else:
                self.catalog.add_vm(replica_spec(spec, storage, stem=None), VmState.REPLICA)
            self.catalog.put_relationship(rel)
            if self.broker is not None and offer.cluster:
                try:
                    await self.broker.claim(offer.cluster, spec.uuid)
                except BaseException:  # not the cluster's: nothing stays here either
                    self.catalog.delete_relationship(spec.uuid)
                    self.catalog.delete(spec.uuid)
                    shutil.rmtree(storage, ignore_errors=True)
                    raise
        log.info("replica of VM %s from %s accepted into %s (%s)", spec.name,
                 caller.common_name, storage, admission.rule)  # fmt: skip
        return self.state(spec.uuid)

    def mapped_spec(self, spec: VmSpec, network_map: Mapping[str, str]) -> VmSpec:
        """The replica VM's spec: its NICs on this host's networks (same MACs), or the refusal.

        The replica VM's spec has the map applied, so failovers start it on
        the right networks; a network this host lacks refuses the offer.
        """
        check_networks(spec, host=self.config.name, host_networks=self.networks().all(),
                       network_map=network_map)  # fmt: skip
        return apply_network_map(spec, network_map)

    def networks(self) -> HostNetworks:
        """This host's networks (only :meth:`checked_state` and failovers touch links)."""
        return HostNetworks(self.config, self.catalog, links=self.links)

    async def checked_state(self, vm_uuid: str) -> ReplicaState:
        """:meth:`state` with the bridges of the replica VM's networks looked at, too.

        What a planned failover asks before it shuts the VM down: a network
        this host has whose bridge is gone would refuse the start here later.
        """
        state = self.state(vm_uuid)
        record = self.catalog.find(vm_uuid)
        if record is None:
            return state
        networks = self.networks()
        have = networks.all()
        gone = []
        for name in dict.fromkeys(nic.network for nic in record.spec.nics):
            net = have.get(name)
            if net is not None and not await asyncio.to_thread(
                networks.links.bridge_exists, net.bridge, net.netns
            ):
                gone.append(f"{name} (bridge {net.bridge})")
        return state.model_copy(update={"missing_bridges": gone})

    async def _adopt(self, record: VmRecord, spec: VmSpec, storage: Path) -> None:
        """``--initial existing``: the VM already here becomes the chain's base."""
        if record.state not in (VmState.OFF, VmState.CRASHED):
            raise ConflictError(
                f"VM {record.name!r} on host {self.config.name!r} is {record.state.value}; "
                "stop it before it can serve as the initial copy"
            )
        if len(record.spec.disks) != len(spec.disks):
            raise ConflictError(f"VM {record.name!r} here has {len(record.spec.disks)} disks, "
                                f"the primary's has {len(spec.disks)}")  # fmt: skip
        for i, (ours, theirs) in enumerate(zip(record.spec.disks, spec.disks, strict=True)):
            if ours.size != theirs.size:
                raise ConflictError(f"disk {i} of VM {record.name!r} here is {ours.size} bytes, "
                                    f"the primary's {theirs.size}")  # fmt: skip
        await self.chain.adopt(record.spec, spec, storage)
        self.states.apply(spec.uuid, VmOp.MAKE_REPLICA)
        self.chain.drop_stale(record.spec, storage)

    # -- recovery points -----------------------------------------------------------

    async def receive(self, caller: CertInfo, vm_uuid: str, point_id: int, point_time: float,
                      stream: AsyncIterator[bytes], *,
                      app_consistent: bool = False) -> PointLinked:  # fmt: skip
        """Link one recovery point streamed by the primary; idempotent per id.

        ``app_consistent``: it was cut with the guest's file systems frozen;
        its id is kept in the relationship for ``replication points``.
        """
        self.partner_relationship(caller, vm_uuid)
        async with self._locks[vm_uuid]:
            rel = self.relationship(vm_uuid)
            if rel.state is ReplicationState.FAILED_OVER:
                raise StateError(
                    f"VM {rel.vm_name!r} failed over to host {self.config.name!r}; it takes no "
                    "recovery points until the failover is cancelled or reversed"
                )
            chain = self.catalog.points(vm_uuid)
            if chain and point_id <= chain[-1].id:
                async for _ in stream:  # a resend after a lost reply: already linked
                    pass
                return PointLinked(point=point_id, linked=False, **self.state(vm_uuid).model_dump())
            record = self.catalog.get(vm_uuid)
            storage = Path(rel.storage)
            disks = len(record.spec.disks)
            stem = f"p{point_id}" if chain else BASE
            targets = [disk_file(storage, stem, i) for i in range(disks)]
            backings: list[Path | None] = (
                [disk_file(storage, chain[-1].file, i) for i in range(disks)]
                if chain else [None] * disks
            )  # fmt: skip
            started = time.monotonic()
            try:
                receiver = PointReceiver(targets, vm_uuid=UUID(vm_uuid), point_id=point_id)
                end = await receive_point(stream, receiver, backings)
            except StorageFullError as exc:  # receive_point removed the partial files
                raise self.full(rel, f"recovery point {point_id}") from exc
            received = time.monotonic()
            rel = self.chain.link(rel, record, PointInfo(id=point_id, time=point_time, file=stem))
            if app_consistent:
                kept = {p.id for p in chain}  # ids merged away are dropped from the list
                ids = (*(i for i in rel.app_consistent_points if i in kept), point_id)
                rel = rel.model_copy(update={"app_consistent_points": ids})
                self.catalog.put_relationship(rel)
            linked = time.monotonic()
            if not is_continuous(rel.frequency_s):
                await self.chain.retain(rel)
            log.info("VM %s: linked recovery point %d (%d bytes of stream; receive %.3f s, of "
                     "which commit %.3f s, link %.3f s, retention %.3f s)", rel.vm_name, point_id,
                     end.wire_bytes, received - started, receiver.commit_s, linked - received,
                     time.monotonic() - linked)  # fmt: skip
        if is_continuous(rel.frequency_s):
            self.retain_later(vm_uuid)  # the reply, and so the cycle, does not wait for merges
        return PointLinked(point=point_id, linked=True, **self.state(vm_uuid).model_dump())

    def retain_later(self, vm_uuid: str) -> None:
        """Run retention in the background (continuous replication), one run per VM at a time.

        A point arriving during a run asks for another run after it; the next
        point waits for the VM's lock only if a run still holds it then.
        """
        if vm_uuid in self._retaining:
            self._retaining[vm_uuid] = True
            return
        self._retaining[vm_uuid] = False
        task = asyncio.create_task(self._retain_loop(vm_uuid), name=f"retain-{vm_uuid}")
        self._retain_tasks.add(task)
        task.add_done_callback(self._retain_tasks.discard)

    async def _retain_loop(self, vm_uuid: str) -> None:
        try:
            while True:
                self._retaining[vm_uuid] = False
                try:
                    await self.retain(vm_uuid)
                    if self.broker is not None and self.relationship(vm_uuid).broker:
                        async with self._locks[vm_uuid]:  # the merged chain, for a new owner
                            await self.broker.publish(vm_uuid)
                except FerryError as exc:
                    log.error("VM %s: retention failed: %s", vm_uuid, exc)
                if not self._retaining[vm_uuid]:
                    return
        finally:
            self._retaining.pop(vm_uuid, None)

    async def block_hashes(self, caller: CertInfo, vm_uuid: str,
                           block_size: int) -> list[list[str]]:  # fmt: skip
        """Per-disk block hashes of the latest point (for a resynchronisation)."""
        rel = self.partner_relationship(caller, vm_uuid)
        async with self._locks[vm_uuid]:
            return await self.chain.latest_hashes(rel, block_size)

    async def receive_file(self, caller: CertInfo, vm_uuid: str, kind: str,
                           stream: AsyncIterator[bytes]) -> FileReceived:  # fmt: skip
        """The VM's kernel or initrd, kept next to its chain."""
        rel = self.partner_relationship(caller, vm_uuid)
        if kind not in ("kernel", "initrd"):
            raise InvalidInputError(f"unknown VM file {kind!r}")
        target = Path(rel.storage) / kind
        partial = target.with_name(kind + ".partial")
        try:
            with os_errors(f"cannot write the {kind} of VM {rel.vm_name!r} to {partial}"):
                with partial.open("wb") as out:
                    async for chunk in stream:
                        out.write(chunk)
                await asyncio.to_thread(fsync_file, partial)
                partial.rename(target)
        except BaseException as exc:
            partial.unlink(missing_ok=True)  # a half-written file is never left
            if isinstance(exc, StorageFullError):
                raise self.full(rel, f"the {kind}") from exc
            raise
        record = self.catalog.get(vm_uuid)
        self.catalog.update_spec(record.spec.model_copy(update={kind: str(target)}))
        return FileReceived(received=kind)

    def full(self, rel: Relationship, what: str) -> StorageFullError:
        """The one line for a replica storage that ran out of space while ``what`` arrived."""
        root = Path(rel.storage).parent
        free = free_mib(root)
        left = "" if free is None else f" ({free} MiB free)"
        return StorageFullError(
            f"replica storage {root} on host {self.config.name!r} is full{left}: free space "
            f"there or choose another --storage ('ferry replica-server enable'); {what} of VM "
            f"{rel.vm_name!r} was not kept",
            path=str(root),
        )

    async def import_initial(self, folder: Path) -> dict[str, Any]:
        """``replication import-initial DIR``: link an initial copy carried on media."""
        from ferry.host.replication.initial_media import import_initial

        return await import_initial(self, folder)

    # -- changing and ending ---------------------------------------------------------

    def update(self, caller: CertInfo, vm_uuid: str, changes: ReplicaChanges) -> ReplicaState:
        """The primary changes the terms, or hands the replica to another primary.

        For a clustered VM another host of the primary's cluster may claim the
        primary's place (its cluster restarted the VM there); only for itself.
        """
        rel = self.relationship(vm_uuid)
        claim = check_primary_change(
            caller_of(caller), vm=rel.vm_name, partner=rel.primary, thumbprint=rel.thumbprint,
            cluster=rel.cluster, hosts=rel.cluster_hosts, new_primary=changes.primary,
            new_thumbprint=changes.thumbprint)  # fmt: skip
        update: dict[str, Any] = {}
        if changes.frequency_s is not None:
            update["frequency_s"] = check_frequency(changes.frequency_s)
            extension = self.catalog.extension(vm_uuid)
            if extension is not None and update["frequency_s"] > extension.frequency_s:
                raise InvalidInputError(
                    f"VM {rel.vm_name!r} is extended from {self.config.name!r} to "
                    f"{extension.host!r} every {format_frequency(extension.frequency_s)}; "
                    "replicating it less often than that breaks the extension's rule (run "
                    f"'ferry replication extend {rel.vm_name} --remove --host "
                    f"{self.config.name}' first)"
                )
        if changes.recovery_points is not None:
            update["recovery_points"] = check_recovery_points(changes.recovery_points)
        if changes.primary and changes.thumbprint:
            # A handover: the VM moved to another primary host.
            update["primary"] = changes.primary
            update["thumbprint"] = changes.thumbprint
            update["primary_url"] = changes.primary_url or ""
        if changes.origin:  # an extended replica: the VM's primary moved
            update["origin"] = changes.origin
            update["origin_url"] = changes.origin_url or ""
        if changes.cluster is not None:  # "" : the VM is standalone again
            update["cluster"] = changes.cluster
            update["cluster_hosts"] = tuple(changes.cluster_hosts or ()) if changes.cluster else ()
        if changes.network_map is not None:
            self._remap(rel, changes.network_map, changes.nics or [])
            update["network_map"] = check_network_map(changes.network_map)
        self.catalog.put_relationship(rel.model_copy(update=update))
        if claim:
            log.info("VM %s: host %s of cluster %s took the primary's place from %s",
                     rel.vm_name, caller.common_name, rel.cluster, rel.primary)  # fmt: skip
        return self.state(vm_uuid)

    def _remap(self, rel: Relationship, network_map: Mapping[str, str],
               nics: list[NicSpec]) -> None:  # fmt: skip
        """A new network map: the replica VM's NICs (as the primary has them), mapped anew."""
        record = self.catalog.get(rel.vm_uuid)
        if record.state is not VmState.REPLICA:
            raise StateError(
                f"the replica of VM {rel.vm_name!r} on host {self.config.name!r} is "
                f"{record.state.value} (failed over or under test): change its network map "
                "once it is a replica again"
            )
        ours = record.spec.model_copy(update={"nics": tuple(nics)})
        self.catalog.update_spec(self.mapped_spec(ours, check_network_map(network_map)))

    async def remove(self, caller: CertInfo, vm_uuid: str) -> ReplicaRemoved:
        """End the relationship; the replica VM stays, as an off VM on its latest point."""
        rel = self.partner_relationship(caller, vm_uuid)
        async with self._locks[vm_uuid]:
            record = self.catalog.get(vm_uuid)
            kept = bool(self.catalog.points(vm_uuid))
            if kept:  # the relationship goes once the flat copy is made (a retry finds it)
                try:
                    await self._flatten(record, Path(rel.storage))
                except StorageFullError as exc:
                    raise StorageFullError(
                        f"{exc}: host {self.config.name!r} cannot turn the replica of VM "
                        f"{record.name!r} into a VM there; free space and run 'ferry "
                        "replication remove' again (the replica is unchanged)",
                        path=exc.path,
                    ) from exc
            else:
                self.catalog.delete_relationship(vm_uuid)
                self.catalog.delete(vm_uuid)
                with contextlib.suppress(OSError):
                    shutil.rmtree(rel.storage)
        log.info("replication of VM %s removed; replica VM %s", record.name,
                 "kept" if kept else "deleted (it had no data)")  # fmt: skip
        return ReplicaRemoved(vm=record.name, kept_replica_vm=kept)

    async def _flatten(self, record: VmRecord, storage: Path) -> None:
        """The VM becomes an ordinary off VM on its latest point; the chain goes.

        The catalog switches to the new files before the chain is deleted, so
        a crash in between leaves only unused chain files behind.
        """
        vm_dir = self.config.data_dir / "vms" / record.uuid  # where VmService keeps its files
        spec = await self.chain.flatten(record.spec, storage, vm_dir)
        self.catalog.delete_relationship(record.uuid)
        self.catalog.update_spec(spec)
        self.states.apply(record, VmOp.RELEASE)
        self.chain.drop(storage, keep=spec)

    def clean_partials(self) -> None:
        """On agent start: drop half-received points (their primaries resend them).

        A replica of the replica broker is left alone: its files are on the cluster's
        volume, and another node may hold it now (its owner cleans up as it goes)."""
        for rel in self.catalog.relationships():
            if rel.role is RelRole.REPLICA and rel.state is not ReplicationState.REMOVED \
                    and not rel.broker:  # fmt: skip
                for partial in Path(rel.storage).glob("*.partial"):
                    partial.unlink(missing_ok=True)

    async def recover(self) -> None:
        self.clean_partials()
        for rel in self.catalog.relationships():
            if rel.role is RelRole.REPLICA and not rel.broker:  # the broker's: as above
                try:
                    async with self._locks[rel.vm_uuid]:
                        await self.chain.retain(rel)
                except FerryError as exc:
                    log.error("VM %s: cannot finish retention: %s", rel.vm_name, exc)
