"""The VMs of one host: create, start, stop, pause, kill, delete, and upgrade.

:class:`VmService` is what the API and the other host services use. It checks
a request against the VM's state (:mod:`ferry.core.vmstate`), holds the VM's
lock for the operation, and leaves the QEMU side to :mod:`.process` (launch,
attach, watch, end), the files of a new VM to :mod:`.files`, a refresh to a
fresh QEMU to :mod:`.refresh`, and every state change to the one writer in
:mod:`.states`.

Each VM has a directory ``<data_dir>/vms/<uuid>/`` with its disks, kernel
files, pidfile, serial log and QEMU log; its QMP socket lives in the host's
short runtime dir.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import shutil
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

from ferry.adapters import qemu
from ferry.adapters.catalog import Catalog, VmRecord
from ferry.adapters.guest_agent import GuestAgent
from ferry.core import vmstate
from ferry.core.cpu_models import CpuFacts, check_model_name, cpu_refusal, default_model
from ferry.core.firmware import INSTALL_HINT, check_boot_disk, check_firmware
from ferry.core.spec import VmSpec, check_name, check_resources
from ferry.core.versions import check_host_runs, machine_type
from ferry.core.vmstate import VmOp, VmState
from ferry.errors import (
    ConflictError,
    GuestAgentError,
    InvalidInputError,
    NotFoundError,
    QemuError,
    StateError,
)
from ferry.host.config import HostConfig
from ferry.host.turns import DiskTurns
from ferry.host.vms import files
from ferry.host.vms.process import QUIT_GRACE_S, VmProcesses, vm_logger
from ferry.host.vms.refresh import refresh_process
from ferry.host.vms.requests import NewDisk, NewVm
from ferry.host.vms.states import VmStates

log = logging.getLogger(__name__)

# Called by stop with the VM's QMP channel and whether it is being forced off.
BeforeQuit = Callable[[qemu.QmpChannel, bool], Awaitable[None]]

# Below this the test guest's kernel does not get to /init (measured: 64M
# hangs silently, 80M boots); refuse rather than let it hang.
TEST_GUEST_MIN_MEMORY = 96 * 1024**2
TEST_GUEST_DISK = 256 * 1024**2


class VmService:
    """Owns this host's VMs and their QEMU processes."""

    def __init__(
        self,
        config: HostConfig,
        catalog: Catalog,
        *,
        accelerator: str,
        host_memory: int,
        host_cpus: int,
        cpu: CpuFacts | None = None,
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.accelerator = accelerator
        # The CPU models this host runs (host/facts.py; none known: none refused).
        self.cpu = cpu or CpuFacts(host=config.name)
        self.host_memory = host_memory
        self.host_cpus = host_cpus
        self.states = VmStates(catalog)
        self.processes = VmProcesses(config, self.states, accelerator=accelerator)
        # Jobs on one VM's disks (move, cycle, live export, refresh) take turns.
        self.turns = DiskTurns()
        # uuid -> what to do instead of "crashed" when that VM's QEMU exits
        # unasked (an incoming migration that failed).
        self.exit_hooks: dict[str, Callable[[], Awaitable[None]]] = self.processes.exit_hooks
        self.vms_dir = self.processes.vms_dir
        self.networks = self.processes.networks

    def _log(self, record: VmRecord) -> logging.LoggerAdapter[logging.Logger]:
        return vm_logger(log, record)

    # -- for the other services ----------------------------------------------

    def apply(self, vm: VmRecord | str, op: VmOp) -> VmState:
        """Change the VM's state by ``op`` (the one writer: :class:`VmStates`)."""
        return self.states.apply(vm, op)

    def vm_dir(self, uuid: str) -> Path:
        return self.processes.vm_dir(uuid)

    def lock(self, uuid: str) -> asyncio.Lock:
        return self.processes.lock(uuid)

    def channel(self, record: VmRecord) -> qemu.QmpChannel:
        return self.processes.channel(record)

    def pid_of(self, uuid: str) -> int | None:
        return self.processes.pid_of(uuid)

    def last_words(self, uuid: str) -> str | None:
        """The first line QEMU wrote to its log in the VM's latest run, if any."""
        return self.processes.last_words(uuid)

    async def launch_incoming(self, record: VmRecord) -> None:
        """Start QEMU paused, waiting for a migration stream (``-incoming defer``)."""
        await self.processes.launch_incoming(record)

    async def end_qemu(self, record: VmRecord) -> None:
        """End the VM's QEMU on purpose (quit, else kill) without a state change."""
        await self.processes.end(record)

    async def forget(self, record: VmRecord, *, keep_disks: bool) -> None:
        """End the VM's QEMU and remove it from this host (it lives elsewhere now)."""
        self.exit_hooks.pop(record.uuid, None)
        await self.processes.end(record)
        if self.catalog.find(record.uuid) is not None:
            await self._remove(record, keep_disks=keep_disks)
        else:
            await asyncio.to_thread(shutil.rmtree, self.vm_dir(record.uuid), True)

    def outdated_binaries(self) -> builtins.list[str]:
        """Running VMs whose QEMU binary was replaced on disk since they started."""
        return self.processes.outdated_binaries()

    async def reattach_all(self) -> None:
        """On agent start: find every VM's QEMU and record its true state."""
        await self.processes.reattach_all()

    async def detach_all(self) -> None:
        """On agent stop: let go of every QEMU and leave them running."""
        await self.processes.detach_all()

    # -- reading -------------------------------------------------------------

    def list(self) -> builtins.list[VmRecord]:
        return self.catalog.vms()

    def get(self, name: str) -> VmRecord:
        record = self.catalog.find(name)
        if record is None:
            raise NotFoundError(f"no VM named {name!r} on host {self.config.name!r}")
        return record

    def console(self, name: str, offset: int = 0) -> tuple[str, int]:
        """The serial log of the VM's current run from byte ``offset``."""
        record = self.get(name)
        path = self.processes.context(record.uuid).serial_log
        try:
            with path.open("rb") as log_file:
                size = log_file.seek(0, 2)
                if offset > size:  # a new run truncated the log
                    offset = 0
                log_file.seek(offset)
                data = log_file.read()
        except FileNotFoundError:
            return "", 0
        return data.decode(errors="replace"), offset + len(data)

    # -- create / delete -----------------------------------------------------

    async def create(self, request: NewVm) -> VmRecord:
        name = check_name(request.name)
        if self.catalog.find(name) is not None:
            raise ConflictError(f"a VM named {name!r} already exists on host {self.config.name!r}")
        check_resources(
            request.memory, request.cpus, host_memory=self.host_memory, host_cpus=self.host_cpus
        )
        version = request.config_version or self.config.functional_level
        check_host_runs(version, self.config.functional_level, host=self.config.name, vm=name)
        if request.guest and (request.kernel or request.initrd):
            raise InvalidInputError("use either --guest test or --kernel/--initrd, not both")
        if request.guest == "test" and request.memory < TEST_GUEST_MIN_MEMORY:
            raise InvalidInputError(
                f"the test guest needs at least {TEST_GUEST_MIN_MEMORY // 1024**2}M of memory"
            )
        if request.initrd and not request.kernel:
            raise InvalidInputError("--initrd needs --kernel")
        disks = list(request.disks)
        if request.guest == "test" and not disks:
            disks = [NewDisk(size=TEST_GUEST_DISK)]

        if request.display not in ("none", "vnc"):
            raise InvalidInputError(f"--display must be none or vnc, not {request.display!r}")
        cpu_model = check_model_name(request.cpu_model or default_model(self.accelerator))
        refusal = cpu_refusal(cpu_model, self.cpu)
        if refusal is not None:
            if request.cpu_model is None:  # the default; say how to choose another
                raise InvalidInputError(f"{refusal}; choose one it runs with --cpu-model")
            raise InvalidInputError(f"--cpu-model: {refusal}")
        firmware = check_firmware(request.firmware)
        check_boot_disk(request.boot_disk, len(disks))
        uefi = self.processes.uefi() if firmware == "uefi" else None
        if firmware == "uefi" and uefi is None:
            raise NotFoundError(f"--firmware uefi: host {self.config.name!r} has no UEFI firmware "
                                f"(OVMF); {INSTALL_HINT}, then create the VM again")  # fmt: skip
        spec = VmSpec(name=name, config_version=version, memory=request.memory, cpus=request.cpus,
                      display="vnc" if request.display == "vnc" else "none", cpu_model=cpu_model,
                      guest_agent=request.guest_agent, firmware=firmware,
                      boot_disk=request.boot_disk)  # fmt: skip
        if request.nics:  # checked (networks, bridges, models, MACs) before anything is made
            spec = spec.model_copy(update={"nics": await self.networks.new_nics(request.nics)})
        vm_dir = self.vm_dir(spec.uuid)
        disk_dir = files.disk_dir(self.config, self.catalog, request.volume, vm_dir)
        vm_dir.mkdir(parents=True)
        disk_dir.mkdir(parents=True, exist_ok=True)
        try:
            on_volume = disk_dir != vm_dir
            boot_dir = disk_dir if request.boot_files_on_volume and on_volume else vm_dir
            boot = await files.copy_boot_files(self.config, request, boot_dir)
            disk_specs = []
            for index, disk in enumerate(disks):
                dst = disk_dir / f"disk{index}.qcow2"
                disk_specs.append(await files.make_disk(self.config, disk, dst, direct=on_volume))
            if uefi is not None:  # the VM's own variable store, after the guest's disks
                dst = disk_dir / f"disk{len(disk_specs)}.qcow2"
                spec = spec.model_copy(update={"vars_disk": len(disk_specs)})
                disk_specs.append(await files.make_vars_store(self.config, uefi, dst,
                                                              direct=on_volume))  # fmt: skip
            spec = spec.model_copy(
                update={
                    "disks": tuple(disk_specs),
                    "kernel": boot.kernel,
                    "initrd": boot.initrd,
                    "append": boot.append,
                }
            )
            record = self.catalog.add_vm(spec)
        except BaseException:
            shutil.rmtree(vm_dir, ignore_errors=True)
            shutil.rmtree(disk_dir, ignore_errors=True)
            raise
        self._log(record).info("created (%d disks, config version %d)", len(disk_specs), version)
        return record

    async def delete(self, name: str, *, force: bool = False) -> None:
        record = self.get(name)
        rel = self.catalog.relationship(record.uuid)
        if rel is not None:
            raise ConflictError(
                f"VM {name!r} on host {self.config.name!r} is the {rel.role.value} of a "
                f"replication relationship ({rel.primary} -> {rel.replica}); run "
                f"'ferry replication remove {name}' first"
            )
        async with self.lock(record.uuid):
            record = self.get(name)
            if vmstate.is_live(record.state):
                if not force:
                    raise ConflictError(
                        f"VM {name!r} is {record.state.value}: stop it first or use --force"
                    )
                await self.processes.kill(record)
            else:
                await self.processes.kill_leftover(record)
            vmstate.transition(self.get(name).state, VmOp.DELETE, vm=name)
            await self._remove(record, keep_disks=False)
        self.processes.drop_lock(record.uuid)
        self._log(record).info("deleted with its disks")

    async def _remove(self, record: VmRecord, *, keep_disks: bool) -> None:
        """Forget the VM: catalog entry, VM dir, and (unless kept) its disks."""
        self.catalog.delete(record.uuid)
        vm_dir = self.vm_dir(record.uuid)
        await asyncio.to_thread(shutil.rmtree, vm_dir, True)
        if keep_disks:
            return
        for disk in record.spec.disks:
            path = Path(disk.path)
            if not path.is_relative_to(vm_dir):
                path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    path.parent.rmdir()  # the VM's dir on a volume, once empty

    # -- start / stop / pause / kill -----------------------------------------

    async def start(self, name: str, *, paused: bool = False) -> VmRecord:
        """Start the VM; ``paused`` starts QEMU with the guest not yet running."""
        record = self.get(name)
        async with self.lock(record.uuid):
            record = self.get(name)
            vmstate.transition(record.state, VmOp.START, vm=name)
            check_host_runs(
                record.spec.config_version,
                self.config.functional_level,
                host=self.config.name,
                vm=name,
            )
            await self.processes.kill_leftover(record)
            # A VM made by replication or failover has no VM dir yet.
            self.vm_dir(record.uuid).mkdir(parents=True, exist_ok=True)
            # A paused start (for a last replication cycle) keeps the console of
            # the run before it: the guest does not run, so nothing is lost.
            ctx = self.processes.context(record.uuid).model_copy(
                update={"paused": paused, "serial_append": paused}
            )
            self.apply(record, VmOp.START)
            try:
                pid = await self.processes.launch(record, ctx)
                await self.processes.attach(record, pid, partial(vmstate.launched, paused=paused))
            except BaseException:
                pid_left = qemu.find_process(ctx.pidfile, record.uuid)
                if pid_left is not None:
                    await qemu.kill_process(pid_left, record.uuid)
                leftover = self.processes.take(record.uuid)
                if leftover is not None:
                    leftover.expect_exit = True
                    await self.processes.detach(leftover)
                self.apply(record, VmOp.START_FAILED)
                raise
            self._log(record).info("started, QEMU pid %d", pid)
            return self.get(name)

    async def stop(self, name: str, *, timeout: float | None = None,
                   before_quit: BeforeQuit | None = None) -> tuple[VmRecord, bool]:  # fmt: skip
        """ACPI power-down; force off after ``timeout``. Returns (record, forced).

        A VM with a guest agent channel gets half the time for ACPI; a guest
        that ignores it is then asked through its agent (``guest-shutdown``)
        for the rest, and only then forced off. ``before_quit`` runs once the
        guest is down (or, ``forced`` True, before it is forced off), while
        QEMU still holds its disks (``-no-shutdown``): copy-roles' last copy.
        """
        record = self.get(name)
        deadline = timeout or self.config.stop_timeout_s
        acpi_wait = deadline / 2 if record.spec.guest_agent else deadline
        async with self.lock(record.uuid):
            record = self.get(name)
            vmstate.transition(record.state, VmOp.STOP, vm=name)
            runtime = self.processes.runtime(record)
            self.apply(record, VmOp.STOP)
            forced, via = True, "forced"
            with contextlib.suppress(QemuError):
                await runtime.channel.execute("system_powerdown")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(runtime.shutdown_seen.wait(), acpi_wait)
                    forced, via = False, "clean"
            ask_agent = forced and record.spec.guest_agent
            if ask_agent and await self._agent_shutdown(record, runtime.shutdown_seen,
                                                        deadline - acpi_wait):  # fmt: skip
                forced, via = False, "clean, through the guest agent"
            runtime.expect_exit = True
            if before_quit is not None:
                await before_quit(runtime.channel, forced)
            if not forced:
                with contextlib.suppress(QemuError):
                    await runtime.channel.execute("quit")
            if forced or not await qemu.wait_gone(runtime.pid, record.uuid, QUIT_GRACE_S):
                await qemu.kill_process(runtime.pid, record.uuid)
            await self.processes.finish_exit(record, runtime, VmOp.STOPPED)
            self._log(record).info("stopped (%s)", via)
            return self.get(name), forced

    async def _agent_shutdown(self, record: VmRecord, seen: asyncio.Event, wait: float) -> bool:
        """``guest-shutdown`` through the guest agent; True once the guest went down in ``wait``."""
        log = self._log(record)
        log.info("the guest ignored ACPI power-down; asking its guest agent to shut down")
        socket = self.processes.guest_agent_socket(record.uuid)
        try:
            # Half the time left at most for the agent to answer its sync.
            async with GuestAgent(socket, vm=record.name,
                                  sync_timeout=min(5.0, max(1.0, wait / 2))) as agent:  # fmt: skip
                await agent.shutdown()
        except GuestAgentError as exc:
            log.warning("guest agent shutdown failed: %s", exc)
            return False
        try:
            await asyncio.wait_for(seen.wait(), max(wait, 1.0))
        except TimeoutError:
            return False
        return True

    async def pause(self, name: str, *, resume: bool = False) -> VmRecord:
        """Freeze the guest's vCPUs (``stop``) or let them run again (``cont``)."""
        record = self.get(name)
        async with self.lock(record.uuid):
            record = self.get(name)
            op = VmOp.RESUME if resume else VmOp.PAUSE
            vmstate.transition(record.state, op, vm=name)  # refused before QEMU is asked
            await self.channel(record).execute("cont" if resume else "stop")
            self.apply(record, op)
            return self.get(name)

    async def kill(self, name: str) -> VmRecord:
        record = self.get(name)
        async with self.lock(record.uuid):
            record = self.get(name)
            vmstate.transition(record.state, VmOp.KILL, vm=name)
            await self.processes.kill(record)
            self._log(record).info("killed")
            return self.get(name)

    async def refresh_process(self, name: str) -> dict[str, Any]:
        """Move a running VM to a fresh QEMU process on this host (see :mod:`.refresh`)."""
        record = self.get(name)
        async with self.lock(record.uuid):
            return await refresh_process(self.processes, self.get(name))

    # -- configuration ---------------------------------------------------------

    async def upgrade_version(self, name: str) -> VmRecord:
        """Raise the VM's configuration version to this host's level (one way)."""
        record = self.get(name)
        async with self.lock(record.uuid):
            record = self.get(name)
            current, target = record.spec.config_version, self.config.functional_level
            if current >= target:
                raise StateError(
                    f"VM {name!r} already has configuration version {current}; host "
                    f"{self.config.name!r} runs up to {target}"
                )
            old_type, new_type = machine_type(current), machine_type(target)
            if vmstate.is_live(record.state) and old_type != new_type:
                raise StateError(
                    f"VM {name!r} is {record.state.value}: configuration version {target} "
                    f"changes its machine type ({old_type} -> {new_type}), which needs a "
                    "restart; stop it first"
                )
            self.catalog.update_spec(record.spec.model_copy(update={"config_version": target}))
            self._log(record).info("configuration version %d -> %d", current, target)
            return self.get(name)

    def add_volume(self, name: str, path: str) -> dict[str, str]:
        check_name(name, what="volume name")
        root = Path(path)
        if not root.is_absolute() or ".." in root.parts:
            raise InvalidInputError(f"volume path {path!r} must be absolute, without '..'")
        if not root.is_dir():
            raise NotFoundError(f"volume path {path!r} is not a dir on host {self.config.name!r}")
        self.catalog.add_volume(name, str(root.resolve()))
        return self.catalog.volumes()
