"""Moving a replica VM, with its recovery points, to another replica host.

``ferry replication set VM --replica NEW`` on the primary (P): when NEW does
not hold the replica yet, P asks the current replica host (R) to move it
(``POST /v1/peer/replicas/{uuid}/move``, authorised by P's pinned
certificate). R then, holding its store lock so no point arrives meanwhile:

1. ends a running test failover (its VM and overlays are deleted: the point it
   ran on is about to leave this host);
2. offers the VM to NEW as if R were its primary, and streams every recovery
   point, the base first and then each overlay, with its own id and time, so
   NEW holds the same points;
3. hands NEW's relationship over to P (``PATCH``: P's name, certificate
   thumbprint and URL), so from then on only P may send to it;
4. forgets the VM here (record, relationship, chain) and answers with NEW's
   certificate thumbprint, which P pins.

Retrying is safe. A failure before step 3 leaves R as it was and NEW with a
partial copy pinned to R; the retry's offer is accepted as a resend and the
points NEW already linked are skipped. After step 3 NEW answers to P, so a
retry of ``set --replica NEW`` finds the replica there and only re-points P;
a copy R did not get to delete is then no longer fed.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

from ferry.adapters.pki import CertInfo
from ferry.core.replication import ReplicationState
from ferry.errors import ConflictError, InvalidInputError, StateError
from ferry.host.failover.service import FailoverService
from ferry.host.replication.receiver import ReplicaStore, disk_file
from ferry.host.replication.sender import PointSender, offer_replica
from ferry.peer.client import Connector, Timeout
from ferry.peer.replication import UPDATE, ReplicaChanges, ReplicaMoved

log = logging.getLogger(__name__)


class ReplicaMover:
    """Moves this host's replica VMs to other replica hosts, when their primaries ask."""

    def __init__(self, store: ReplicaStore, sender: PointSender, failover: FailoverService,
                 url: str, peers: Connector) -> None:  # fmt: skip
        self.store = store
        self.sender = sender
        self.failover = failover
        self.url = url
        self.peers = peers
        self.config = store.config
        self.catalog = store.catalog

    async def move(self, caller: CertInfo, vm_uuid: str, to: str, to_url: str) -> ReplicaMoved:
        rel = self.store.relationship(vm_uuid)
        self.store.check_primary(caller, rel)
        name = rel.vm_name
        if to == self.config.name or to == rel.primary:
            raise InvalidInputError(f"host {to!r} cannot take the replica of VM {name!r}: it "
                                    "is the replica host or the primary already")  # fmt: skip
        if rel.state is ReplicationState.FAILED_OVER:
            raise StateError(f"VM {name!r} failed over on host {self.config.name!r}; its replica "
                             "cannot move until the failover is cancelled")  # fmt: skip
        extension = self.catalog.extension(vm_uuid)
        if extension is not None:
            raise ConflictError(
                f"the replica of VM {name!r} is extended to {extension.host!r}; end that first "
                f"('ferry replication extend {name} --remove --host {self.config.name}')"
            )
        if rel.test_vm is not None:
            log.info("VM %s: its replica moves to %s, so the test failover ends", name, to)
            await self.failover.stop_test(name)
        async with self.store.lock(vm_uuid):
            record = self.catalog.get(vm_uuid)
            storage = Path(rel.storage)
            chain = self.catalog.points(vm_uuid)
            sent = 0
            async with self.peers.connect(to, to_url, timeout=Timeout.TRANSFER) as peer:
                thumbprint = await offer_replica(
                    peer, record.spec, sender=self.config.name,
                    level=self.config.functional_level, frequency_s=rel.frequency_s,
                    recovery_points=rel.recovery_points, primary_url=self.url)  # fmt: skip
                for point in chain:
                    files = [disk_file(storage, point.file, i)
                             for i in range(len(record.spec.disks))]  # fmt: skip
                    frozen = point.id in rel.app_consistent_points
                    _, wire = await self.sender.send(peer, vm_uuid, point.id, point.time, files,
                                                     compress=True,
                                                     app_consistent=frozen)  # fmt: skip
                    sent += wire
                # From now on only the primary may send to the new replica host.
                primary = ReplicaChanges(primary=rel.primary, thumbprint=rel.thumbprint,
                                         primary_url=rel.primary_url)  # fmt: skip
                await peer.call(UPDATE, primary, uuid=vm_uuid)
            self.catalog.delete_relationship(vm_uuid)
            self.catalog.delete(vm_uuid)
            await asyncio.to_thread(shutil.rmtree, storage, True)
        log.info("VM %s: replica moved to %s (%d points, %d bytes)", name, to, len(chain), sent)
        return ReplicaMoved(vm=name, host=to, thumbprint=thumbprint, points=len(chain), bytes=sent)
