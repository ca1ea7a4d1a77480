"""Live migration between hosts on one agent: the entry point the API and agent use.

A move's source job lives in :mod:`.source` (phases only), the incoming
side in :mod:`.destination` (the peer endpoints of
:mod:`ferry.peer.migration`), what an agent restart finds in
:mod:`.recovery`, and what one try has done in :mod:`.attempt`. QEMU's side
of every step is :mod:`ferry.adapters.migration`; the phases and the
one-running-copy rule are :mod:`ferry.core.migration`.
"""

from __future__ import annotations

from collections.abc import Mapping

from ferry.core.migration import Storage
from ferry.core.tasks import cancel_and_wait
from ferry.host.jobs import Job, JobRegistry
from ferry.host.migration import recovery
from ferry.host.migration.attempt import INCOMING, MOVE
from ferry.host.migration.destination import MoveDestination
from ferry.host.migration.source import MoveObserver, MoveSource, SwitchGuard
from ferry.host.vms.service import VmService
from ferry.peer.client import Connector
from ferry.peer.server import PeerServer

__all__ = ["INCOMING", "MOVE", "MigrationService", "MoveObserver", "SwitchGuard"]


class MigrationService:
    """Both sides of live migration on one host."""

    def __init__(self, vms: VmService, jobs: JobRegistry, peers: Connector) -> None:
        self.vms = vms
        self.jobs = jobs
        self.source = MoveSource(vms, jobs, peers)
        self.destination = MoveDestination(vms, jobs)

    @property
    def observer(self) -> MoveObserver | None:
        """What else must follow a VM that moved here from (its replication)."""
        return self.source.observer

    @observer.setter
    def observer(self, observer: MoveObserver | None) -> None:
        self.source.observer = observer

    @property
    def switch_guard(self) -> SwitchGuard | None:
        """What changes hands at the switch-over itself (a clustered VM's owner)."""
        return self.source.switch_guard

    @switch_guard.setter
    def switch_guard(self, guard: SwitchGuard | None) -> None:
        self.source.switch_guard = guard

    def register(self, server: PeerServer) -> None:
        """Answer the migration peer endpoints (this host as a destination)."""
        self.destination.register(server)

    def start_move(
        self,
        name: str,
        *,
        to: str,
        to_url: str,
        storage: Storage,
        max_bandwidth: int | None,
        downtime_limit_ms: int | None,
        network_map: Mapping[str, str] | None = None,
        postcopy: bool = False,
    ) -> Job:
        return self.source.start_move(name, to=to, to_url=to_url, storage=storage,
                                      max_bandwidth=max_bandwidth,
                                      downtime_limit_ms=downtime_limit_ms,
                                      network_map=network_map, postcopy=postcopy)  # fmt: skip

    async def preflight(self, name: str, *, to: str, to_url: str,
                        network_map: Mapping[str, str]) -> None:  # fmt: skip
        """Refuse a move the destination could not take (its networks) before it starts."""
        await self.source.preflight(name, to=to, to_url=to_url, network_map=network_map)

    def cancel(self, job_id: str) -> Job:
        return self.source.cancel(job_id)

    def is_incoming(self, uuid: str) -> bool:
        """True while a VM is arriving here and still runs on its source."""
        return self.destination.is_incoming(uuid)

    async def recover(self) -> None:
        """Finish or undo every move that was under way when the agent stopped."""
        await recovery.recover(self.source, self.destination)

    async def shutdown(self) -> None:
        """Agent stopping: undo moves under way (the VMs stay here), then return."""
        running = [job.task for job in self.jobs.all()
                   if job.task is not None and not job.task.done()]  # fmt: skip
        await cancel_and_wait(*running)
