"""A VM service without QEMU, for unit tests of services that start, stop and delete VMs.

:class:`FakeVms` keeps its VMs in a real :class:`~ferry.adapters.catalog.Catalog`
and changes their states only through the real table
(:class:`~ferry.host.vms.states.VmStates`), so a service under test meets the
same refusals as on a host. Starting a VM only records that it runs: there is
no process and no QMP. Every call lands in :attr:`FakeVms.calls` as
``(method, vm name)`` so a test can assert what a service did, in order, and
:attr:`FakeVms.fail` makes the next call of a method raise.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from ferry.adapters.catalog import Catalog, VmRecord
from ferry.core.cpu_models import CpuFacts
from ferry.core.vmstate import VmOp, VmState, is_live
from ferry.errors import ConflictError, FerryError, NotFoundError
from ferry.host.config import HostConfig
from ferry.host.vms.states import VmStates


@dataclass
class FakeVms:
    """The VM service's calls that other services make, over a real catalog."""

    config: HostConfig
    catalog: Catalog
    calls: list[tuple[str, str]] = field(default_factory=list)
    fail: dict[str, FerryError] = field(default_factory=dict)  # method -> error, once
    # Set to make start() wait until the test sets it (to act while a VM boots).
    start_gate: asyncio.Event | None = None
    # The CPU models this host runs (none known: none refused).
    cpu: CpuFacts = field(default_factory=lambda: CpuFacts(host="fake"))

    def __post_init__(self) -> None:
        self.states = VmStates(self.catalog)

    def _call(self, method: str, name: str) -> None:
        self.calls.append((method, name))
        error = self.fail.pop(method, None)
        if error is not None:
            raise error

    def get(self, name: str) -> VmRecord:
        record = self.catalog.find(name)
        if record is None:
            raise NotFoundError(f"no VM named {name!r} on host {self.config.name!r}")
        return record

    def apply(self, vm: VmRecord | str, op: VmOp) -> VmState:
        return self.states.apply(vm, op)

    async def start(self, name: str, *, paused: bool = False) -> VmRecord:
        record = self.get(name)
        self._call("start-paused" if paused else "start", name)
        self.apply(record, VmOp.START)
        if self.start_gate is not None:
            await self.start_gate.wait()
        self.apply(record, VmOp.STARTED_PAUSED if paused else VmOp.STARTED)
        return self.get(name)

    async def stop(self, name: str, *, timeout: float | None = None) -> tuple[VmRecord, bool]:
        record = self.get(name)
        self._call("stop", name)
        self.apply(record, VmOp.STOP)
        self.apply(record, VmOp.STOPPED)
        return self.get(name), False

    async def kill(self, name: str) -> VmRecord:
        record = self.get(name)
        self._call("kill", name)
        self.apply(record, VmOp.KILL)
        return self.get(name)

    async def delete(self, name: str, *, force: bool = False) -> None:
        record = self.get(name)
        self._call("delete", name)
        if is_live(record.state):
            if not force:
                raise ConflictError(f"VM {name!r} is {record.state.value}: stop it first")
            self.apply(record, VmOp.KILL)
        self.catalog.delete(record.uuid)
        for disk in record.spec.disks:
            Path(disk.path).unlink(missing_ok=True)

    async def end_qemu(self, record: VmRecord) -> None:
        """As the real one: the QEMU ends, the state is the caller's to change."""
        self._call("end-qemu", record.name)
