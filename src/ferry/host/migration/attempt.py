"""One try at moving a VM, as the source's move job knows it.

A :class:`MoveAttempt` grows as the move goes on: the VM's record once it is
marked migrating, the peer once the destination may hold a trace, the
chosen storage, the streams set up in the source QEMU. Undo reads it to take
back exactly what was done, and nothing once the destination was asked to
resume (``finish_called``): from then on only the destination's word decides.
"""

from __future__ import annotations

from dataclasses import dataclass

from ferry.adapters.catalog import VmRecord
from ferry.adapters.migration import OutgoingMigration
from ferry.core.migration import Storage
from ferry.host.jobs import Job
from ferry.peer.client import PeerClient

MOVE = "move"  # job kind on the source
INCOMING = "incoming"  # job kind on the destination (same id as the move)
KERNEL_FILES = ("kernel", "initrd")  # VM files that travel with a move


@dataclass
class MoveAttempt:
    job: Job
    started: float  # time.monotonic() when the job began to run
    record: VmRecord | None = None  # set once the VM is marked migrating here
    peer: PeerClient | None = None  # set once the destination may hold a trace
    storage: Storage | None = None  # what the destination chose
    qemu: OutgoingMigration | None = None  # the streams out of the source QEMU
    finish_called: bool = False  # the destination was asked to resume
    resumed_at: float | None = None  # time.monotonic() when it said it runs

    @property
    def target(self) -> str:
        return str(self.job.detail["target"])

    @property
    def target_url(self) -> str:
        return str(self.job.detail["target_url"])
