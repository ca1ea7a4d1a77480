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
from typing import Any

from ferry.adapters.pki import CertInfo, client_ssl_context
from ferry.client.agent_client import AgentClient
from ferry.core.replication import ReplicationState
from ferry.errors import ConflictError, InvalidInputError, StateError
from ferry.host.failover.service import FailoverService
from ferry.host.replication.cycle import CycleRunner, offer_replica
from ferry.host.replication.receiver import ReplicaStore, disk_file

log = logging.getLogger(__name__)

PEER_TIMEOUT_S = 3600.0


class ReplicaMover:
    def __init__(self, store: ReplicaStore, cycles: CycleRunner, failover: FailoverService,
                 url: str) -> None:  # fmt: skip
        self.store = store
        self.cycles = cycles
        self.failover = failover
        self.url = url
        self.config = store.config
        self.catalog = store.catalog
        self._tls = client_ssl_context(self.config.tls_dir)

    async def move(self, caller: CertInfo, vm_uuid: str, to: str, to_url: str) -> dict[str, Any]:
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
            client = AgentClient(to, to_url, self._tls, server_name=to, timeout=PEER_TIMEOUT_S)
            async with client as peer:
                thumbprint = await offer_replica(
                    peer, record.spec, sender=self.config.name, receiver=to,
                    level=self.config.functional_level, frequency_s=rel.frequency_s,
                    recovery_points=rel.recovery_points, initial="network",
                    primary_url=self.url)  # fmt: skip
                for point in chain:
                    files = [disk_file(storage, point.file, i)
                             for i in range(len(record.spec.disks))]  # fmt: skip
                    _, wire = await self.cycles.stream_point(peer, vm_uuid, point.id, point.time,
                                                             files, compress=True)  # fmt: skip
                    sent += wire
                # From now on only the primary may send to the new replica host.
                await peer.call("PATCH", f"/v1/peer/replicas/{vm_uuid}", body={
                    "primary": rel.primary, "thumbprint": rel.thumbprint,
                    "primary_url": rel.primary_url})  # fmt: skip
            self.catalog.delete_relationship(vm_uuid)
            self.catalog.delete(vm_uuid)
            await asyncio.to_thread(shutil.rmtree, storage, True)
        log.info("VM %s: replica moved to %s (%d points, %d bytes)", name, to, len(chain), sent)
        return {"vm": name, "host": to, "thumbprint": thumbprint, "points": len(chain),
                "bytes": sent}  # fmt: skip
