"""The QEMU processes of this host's VMs: launch, attach, watch, end, re-attach.

The catalog state is written *before* an action that could leave a process
behind (``starting``, ``stopping``), so an agent that dies midway finds out on
restart what to look for: :meth:`VmProcesses.reattach_all` checks every VM's
pidfile against the live process table and records the truth.

While a VM runs, a watcher task holds its QMP connection and turns what QEMU
says into operations on the VM's state: a guest that powers itself off
becomes ``off``, a QEMU that vanishes unasked ``crashed``, and a run state
QEMU changed on its own (a guest that panicked, an I/O error that paused it)
is observed under the VM's lock, so an operation under way (``vm pause``)
records its own outcome first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.adapters import qemu
from ferry.adapters.catalog import VmRecord
from ferry.adapters.firmware import find_uefi
from ferry.core import vmstate
from ferry.core.firmware import UefiFirmware
from ferry.core.spec import RunContext, qemu_argv
from ferry.core.tasks import cancel_and_wait
from ferry.core.vmstate import QemuStatus, VmOp, VmState
from ferry.errors import FerryError, QemuError
from ferry.host.config import HostConfig
from ferry.host.networks import HostNetworks
from ferry.host.vms.states import VmStates

log = logging.getLogger(__name__)

QUIT_GRACE_S = 10.0
QEMU_LOG = "qemu.log"  # per VM dir; the run before is kept as qemu.log.1
# States whose operation is under way and records its own outcome: events of
# the VM's QEMU meanwhile are its doing, not news.
_BUSY = frozenset({VmState.STOPPING, VmState.STARTING, VmState.MIGRATING})

# What an attach records, chosen from QEMU's status (default: what QEMU says).
Decide = Callable[[QemuStatus], VmOp]


def short_name(uuid: str) -> str:
    """A VM's name in the runtime dir, where socket paths must stay short."""
    return uuid.replace("-", "")[:16]


def vm_logger(parent: logging.Logger, record: VmRecord) -> logging.LoggerAdapter[logging.Logger]:
    """The child logger of one VM."""
    return logging.LoggerAdapter(parent.getChild(record.name),
                                 {"vm": record.name, "vm_uuid": record.uuid})  # fmt: skip


@dataclass
class Runtime:
    """A live QEMU the agent is attached to."""

    pid: int
    channel: qemu.QmpChannel
    shutdown_seen: asyncio.Event = field(default_factory=asyncio.Event)
    expect_exit: bool = False
    watcher: asyncio.Task[None] | None = None


class VmProcesses:
    """The QEMUs this agent is attached to, one per VM at most."""

    def __init__(self, config: HostConfig, states: VmStates, *, accelerator: str) -> None:
        self.config = config
        self.states = states
        self.catalog = states.catalog
        self.accelerator = accelerator
        self._runtimes: dict[str, Runtime] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._uefi: UefiFirmware | None = None
        self._background: set[asyncio.Task[None]] = set()
        # uuid -> what to do instead of "crashed" when that VM's QEMU exits
        # unasked (an incoming migration that failed).
        self.exit_hooks: dict[str, Callable[[], Awaitable[None]]] = {}
        self.vms_dir = config.data_dir / "vms"
        self.vms_dir.mkdir(parents=True, exist_ok=True)
        # The host's networks: each NIC's tap joins its bridge once QEMU made it.
        self.networks = HostNetworks(config, states.catalog)
        config.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- names -------------------------------------------------------------

    def vm_dir(self, uuid: str) -> Path:
        return self.vms_dir / uuid

    def context(self, uuid: str, *, incoming: bool = False) -> RunContext:
        vm_dir = self.vm_dir(uuid)
        uefi = self.uefi()
        return RunContext(
            incoming=incoming,
            qemu_binary=self.config.qemu_binary,
            accelerator=self.accelerator,
            pidfile=vm_dir / "qemu.pid",
            qmp_socket=self.config.runtime_dir / f"{short_name(uuid)}.qmp",
            serial_log=vm_dir / "serial.log",
            qemu_log=vm_dir / QEMU_LOG,
            image_locking=self.config.image_locking,
            vnc_socket=self.vnc_socket(uuid),
            tap_host=self.networks.key,
            guest_agent_socket=self.guest_agent_socket(uuid),
            test_monitor_socket=(
                self.config.runtime_dir / f"{short_name(uuid)}.tqmp"
                if self.config.test_monitor
                else None
            ),
            uefi_code=uefi.code if uefi else None,
            uefi_code_format=uefi.code_format if uefi else "raw",
        )

    def uefi(self) -> UefiFirmware | None:
        """This host's OVMF; looked for again until found (installing ovmf needs no restart)."""
        if self._uefi is None:
            self._uefi = find_uefi(self.config.firmware_descriptors)
        return self._uefi

    def vnc_socket(self, uuid: str) -> Path:
        """Where the VM's QEMU serves its VNC display (a VM with display "vnc")."""
        return self.config.runtime_dir / f"{short_name(uuid)}.vnc"

    def guest_agent_socket(self, uuid: str) -> Path:
        """Where the VM's QEMU serves its guest agent channel (a VM with guest_agent)."""
        return self.config.runtime_dir / f"{short_name(uuid)}.qga"

    def _remove_sockets(self, uuid: str) -> None:
        """The QMP, VNC and guest agent sockets of a QEMU that has gone."""
        ctx = self.context(uuid)
        ctx.qmp_socket.unlink(missing_ok=True)
        for path in (ctx.vnc_socket, ctx.guest_agent_socket):
            if path is not None:
                path.unlink(missing_ok=True)

    def lock(self, uuid: str) -> asyncio.Lock:
        """One operation on a VM at a time (and the watcher's observations between)."""
        return self._locks[uuid]

    def drop_lock(self, uuid: str) -> None:
        self._locks.pop(uuid, None)

    # -- the attached QEMU ---------------------------------------------------

    def pid_of(self, uuid: str) -> int | None:
        runtime = self._runtimes.get(uuid)
        return runtime.pid if runtime else None

    def runtime(self, record: VmRecord) -> Runtime:
        runtime = self._runtimes.get(record.uuid)
        if runtime is None:
            raise QemuError(f"VM {record.name!r} has no attached QEMU; 'ferry vm kill' ends it")
        return runtime

    def take(self, uuid: str) -> Runtime | None:
        """Let go of the VM's runtime without ending it (the caller ends it)."""
        return self._runtimes.pop(uuid, None)

    def channel(self, record: VmRecord) -> qemu.QmpChannel:
        return self.runtime(record).channel

    def last_words(self, uuid: str) -> str | None:
        """The first line QEMU wrote to its log in the VM's latest run, if any."""
        return qemu.first_log_line(self.vm_dir(uuid) / QEMU_LOG)

    def outdated_binaries(self) -> list[str]:
        """Running VMs whose QEMU binary was replaced on disk since they started."""
        stale = []
        for record in self.catalog.vms():
            runtime = self._runtimes.get(record.uuid)
            if runtime is None:
                continue
            with contextlib.suppress(OSError):
                if str(Path(f"/proc/{runtime.pid}/exe").readlink()).endswith(" (deleted)"):
                    stale.append(record.name)
        return stale

    # -- launching and attaching -------------------------------------------

    async def launch(self, record: VmRecord, ctx: RunContext) -> int:
        """Run the VM's QEMU with ``ctx``; its pid (not attached yet)."""
        ctx.qmp_socket.unlink(missing_ok=True)
        if ctx.vnc_socket is not None:
            ctx.vnc_socket.unlink(missing_ok=True)
        await self.networks.check_runnable(record.spec)
        pid = await qemu.launch(qemu_argv(record.spec, ctx), pidfile=ctx.pidfile,
                                uuid=record.uuid, log=ctx.qemu_log)  # fmt: skip
        if record.spec.nics:
            try:
                await self.networks.attach(record.spec, ctx.tap_slot)
            except BaseException:
                await qemu.kill_process(pid, record.uuid)
                raise
        return pid

    async def launch_incoming(self, record: VmRecord) -> None:
        """Start QEMU paused, waiting for a migration stream (``-incoming defer``)."""
        pid = await self.launch(record, self.context(record.uuid, incoming=True))
        await self.attach(record, pid)

    async def attach(
        self, record: VmRecord, pid: int, decide: Decide = vmstate.observed
    ) -> VmState:
        """Connect QMP, record what ``decide`` makes of QEMU's status, start watching."""
        channel = qemu.QmpChannel(self.context(record.uuid).qmp_socket, name=record.name)
        await channel.connect()
        runtime = Runtime(pid=pid, channel=channel)
        self._runtimes[record.uuid] = runtime
        try:
            status = await channel.status()
        except BaseException:
            self._runtimes.pop(record.uuid, None)
            await channel.close()
            raise
        if status is QemuStatus.SHUTDOWN:
            # The guest powered off while nobody watched; finish the job.
            await self.quit(runtime, record.uuid)
            await self.finish_exit(record, runtime, vmstate.observed(status))
            return VmState.OFF
        state = self.states.apply(record, decide(status))
        runtime.watcher = asyncio.create_task(
            self._watch(record, runtime), name=f"watch-{record.name}"
        )
        return state

    async def detach(self, runtime: Runtime) -> None:
        watcher = runtime.watcher
        if watcher is not None and watcher is not asyncio.current_task():
            await cancel_and_wait(watcher)
        await runtime.channel.close()

    # -- ending --------------------------------------------------------------

    @staticmethod
    async def quit(runtime: Runtime, uuid: str) -> None:
        """End a QEMU on purpose: ask it to quit, SIGKILL it if it lingers."""
        runtime.expect_exit = True
        with contextlib.suppress(QemuError, TimeoutError):
            await asyncio.wait_for(runtime.channel.execute("quit"), 5)
        if not await qemu.wait_gone(runtime.pid, uuid, QUIT_GRACE_S):
            await qemu.kill_process(runtime.pid, uuid)

    async def finish_exit(self, record: VmRecord, runtime: Runtime, op: VmOp) -> None:
        """The VM's QEMU is gone: let go of it and record ``op``."""
        self._runtimes.pop(record.uuid, None)
        await self.detach(runtime)
        self._remove_sockets(record.uuid)
        await self.networks.remove_taps(record.spec)
        self.states.apply(record, op)

    async def kill_leftover(self, record: VmRecord) -> None:
        """End a QEMU of an off/crashed VM (a panicked guest keeps one)."""
        runtime = self._runtimes.pop(record.uuid, None)
        if runtime is not None:
            runtime.expect_exit = True
            await self.detach(runtime)
        pid = qemu.find_process(self.context(record.uuid).pidfile, record.uuid)
        if pid is not None:
            await qemu.kill_process(pid, record.uuid)
        await self.networks.remove_taps(record.spec)

    async def kill(self, record: VmRecord) -> None:
        """SIGKILL the VM's QEMU and record it off (the caller holds the lock)."""
        runtime = self._runtimes.get(record.uuid)
        if runtime is not None:
            runtime.expect_exit = True
            await qemu.kill_process(runtime.pid, record.uuid)
            await self.finish_exit(record, runtime, VmOp.KILL)
        else:
            await self.kill_leftover(record)
            self.states.apply(record, VmOp.KILL)

    async def end(self, record: VmRecord) -> None:
        """End the VM's QEMU on purpose (quit, else kill) without a state change."""
        runtime = self._runtimes.pop(record.uuid, None)
        if runtime is not None:
            await self.quit(runtime, record.uuid)
            await self.detach(runtime)
        await self.kill_leftover(record)
        self._remove_sockets(record.uuid)

    # -- watching ------------------------------------------------------------

    async def _watch(self, record: VmRecord, runtime: Runtime) -> None:
        vm_log = vm_logger(log, record)
        events = asyncio.create_task(self._handle_events(record, runtime))
        try:
            await runtime.channel.wait_closed()
        finally:
            await cancel_and_wait(events)
        if runtime.expect_exit or self._runtimes.get(record.uuid) is not runtime:
            return
        hook = self.exit_hooks.pop(record.uuid, None)
        if hook is not None:
            self._runtimes.pop(record.uuid, None)
            await runtime.channel.close()
            await hook()
            return
        # QEMU went away on its own.
        gone = await qemu.wait_gone(runtime.pid, record.uuid, QUIT_GRACE_S)
        op = VmOp.STOPPED if runtime.shutdown_seen.is_set() and gone else VmOp.CRASHED
        if not gone:
            await qemu.kill_process(runtime.pid, record.uuid)
        self._runtimes.pop(record.uuid, None)
        await runtime.channel.close()
        self._remove_sockets(record.uuid)
        await self.networks.remove_taps(record.spec)
        state = self.states.apply(record, op)
        vm_log.warning("QEMU pid %d exited unexpectedly; VM is %s", runtime.pid, state.value)

    async def _handle_events(self, record: VmRecord, runtime: Runtime) -> None:
        async for event in runtime.channel.events():
            kind = event.get("event")
            if kind == "SHUTDOWN":
                runtime.shutdown_seen.set()
                data: dict[str, Any] = event.get("data") or {}
                current = self.catalog.find(record.uuid)
                if data.get("guest") and current and current.state != VmState.STOPPING:
                    self._in_background(self._guest_powered_off(record, runtime))
            elif kind in ("STOP", "RESUME", "GUEST_PANICKED"):
                self._in_background(self._observe(record, runtime))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _observe(self, record: VmRecord, runtime: Runtime) -> None:
        """QEMU changed its run state: record what it says, unless an operation owns it."""
        async with self.lock(record.uuid):
            current = self.catalog.find(record.uuid)
            if self._runtimes.get(record.uuid) is not runtime or current is None:
                return
            if current.state in _BUSY:
                return
            try:
                status = await runtime.channel.status()
                if status is not QemuStatus.SHUTDOWN:  # the SHUTDOWN event handles that
                    self.states.apply(record, vmstate.observed(status))
            except FerryError as exc:
                vm_log = vm_logger(log, record)
                vm_log.warning("cannot record the state QEMU reports: %s", exc)

    async def _guest_powered_off(self, record: VmRecord, runtime: Runtime) -> None:
        """A guest shut itself down: end its QEMU and record it off."""
        async with self.lock(record.uuid):
            if self._runtimes.get(record.uuid) is not runtime:
                return
            await self.quit(runtime, record.uuid)
            await self.finish_exit(record, runtime, VmOp.STOPPED)
            vm_logger(log, record).info("guest powered off")

    # -- agent start and stop ------------------------------------------------

    async def reattach_all(self) -> None:
        """On agent start: find every VM's QEMU and record its true state."""
        for record in self.catalog.vms():
            vm_log = vm_logger(log, record)
            pid = qemu.find_process(self.context(record.uuid).pidfile, record.uuid)
            if pid is None:
                if vmstate.is_live(record.state):
                    # It was meant to run (or to be stopping) and is gone.
                    was_stopping = record.state == VmState.STOPPING
                    op = VmOp.STOPPED if was_stopping else VmOp.CRASHED
                    state = self.states.apply(record, op)
                    vm_log.warning("QEMU gone while the agent was away; VM is %s", state.value)
                continue
            if not vmstate.may_have_qemu(record.state):
                # Off or a replica copy: no QEMU belongs to it, so this one is
                # a leftover (every path that records off ends the QEMU first).
                vm_log.warning("ending QEMU pid %d left over by a VM that is %s", pid,
                               record.state.value)  # fmt: skip
                await qemu.kill_process(pid, record.uuid)
                continue
            try:
                state = await self.attach(record, pid)
            except FerryError as exc:
                vm_log.error("cannot re-attach to QEMU pid %d: %s", pid, exc)
                self.states.apply(record, VmOp.CRASHED)
                continue
            vm_log.info("re-attached to QEMU pid %d; VM is %s", pid, state.value)
            if record.spec.nics and record.uuid in self._runtimes:
                try:  # the agent may have died between QEMU's start and the attach
                    slot = await self.networks.slot_of(record.spec)
                    await self.networks.attach(record.spec, slot)
                except FerryError as exc:
                    vm_log.error("cannot attach the NICs' taps to their bridges: %s", exc)
        running = [r.spec for r in self.catalog.vms() if r.uuid in self._runtimes]
        for tap in await self.networks.cleanup(running):
            log.warning("removed tap %s that no running QEMU of this host owns", tap)

    async def detach_all(self) -> None:
        """On agent stop: let go of every QEMU and leave them running."""
        for runtime in list(self._runtimes.values()):
            runtime.expect_exit = True  # the connection drop is ours, not a crash
            await self.detach(runtime)
        self._runtimes.clear()
