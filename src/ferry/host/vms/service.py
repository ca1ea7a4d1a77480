"""The VMs of one host: create, start, stop, kill, delete, and re-attach.

Each VM has a directory ``<data_dir>/vms/<uuid>/`` with its disks, kernel
files, pidfile and serial log; its QMP socket lives in the host's short
runtime dir. The catalog state is written *before* an action that could leave
a process behind (``starting``, ``stopping``), so an agent that dies midway
finds out on restart what to look for: :meth:`VmService.reattach_all` checks
every VM's pidfile against the live process table and records the truth.

While a VM runs, a watcher task holds its QMP connection and turns QEMU events
into state changes: a guest that powers itself off becomes ``off``, a QEMU that
vanishes unasked becomes ``crashed``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import shutil
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.adapters import qemu, qemu_img
from ferry.adapters.catalog import Catalog, VmRecord
from ferry.api.models import CreateVmRequest, DiskRequest
from ferry.core import vmstate
from ferry.core.spec import DiskSpec, RunContext, VmSpec, check_name, check_resources, qemu_argv
from ferry.core.tasks import cancel_and_wait
from ferry.core.versions import check_host_runs, machine_type
from ferry.core.vmstate import VmOp, VmState
from ferry.errors import (
    ConflictError,
    FerryError,
    InvalidInputError,
    NotFoundError,
    QemuError,
    StateError,
)
from ferry.guest.build import default_cache_dir, ensure_guest
from ferry.host.config import HostConfig

log = logging.getLogger(__name__)

QUIT_GRACE_S = 10.0
QEMU_LOG = "qemu.log"  # per VM dir; the run before is kept as qemu.log.1
# Below this the test guest's kernel does not get to /init (measured: 64M
# hangs silently, 80M boots); refuse rather than let it hang.
TEST_GUEST_MIN_MEMORY = 96 * 1024**2


def _short(uuid: str) -> str:
    """A VM's name in the runtime dir, where socket paths must stay short."""
    return uuid.replace("-", "")[:16]


@dataclass
class _Runtime:
    """A live QEMU the agent is attached to."""

    pid: int
    channel: qemu.QmpChannel
    shutdown_seen: asyncio.Event = field(default_factory=asyncio.Event)
    expect_exit: bool = False
    watcher: asyncio.Task[None] | None = None


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
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.accelerator = accelerator
        self.host_memory = host_memory
        self.host_cpus = host_cpus
        self._runtimes: dict[str, _Runtime] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._background: set[asyncio.Task[None]] = set()
        # uuid -> what to do instead of "crashed" when that VM's QEMU exits
        # unasked (an incoming migration that failed).
        self.exit_hooks: dict[str, Callable[[], Awaitable[None]]] = {}
        self.vms_dir = config.data_dir / "vms"
        self.vms_dir.mkdir(parents=True, exist_ok=True)
        config.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- paths -------------------------------------------------------------

    def vm_dir(self, uuid: str) -> Path:
        return self.vms_dir / uuid

    def _ctx(self, uuid: str, *, incoming: bool = False) -> RunContext:
        vm_dir = self.vm_dir(uuid)
        return RunContext(
            incoming=incoming,
            qemu_binary=self.config.qemu_binary,
            accelerator=self.accelerator,
            pidfile=vm_dir / "qemu.pid",
            qmp_socket=self.config.runtime_dir / f"{_short(uuid)}.qmp",
            serial_log=vm_dir / "serial.log",
            qemu_log=vm_dir / QEMU_LOG,
        )

    def _log(self, record: VmRecord) -> logging.LoggerAdapter[logging.Logger]:
        return logging.LoggerAdapter(log.getChild(record.name), {"vm": record.uuid})

    # -- reading -----------------------------------------------------------

    def list(self) -> list[VmRecord]:
        return self.catalog.vms()

    def get(self, name: str) -> VmRecord:
        record = self.catalog.find(name)
        if record is None:
            raise NotFoundError(f"no VM named {name!r} on host {self.config.name!r}")
        return record

    def pid_of(self, uuid: str) -> int | None:
        runtime = self._runtimes.get(uuid)
        return runtime.pid if runtime else None

    def console(self, name: str, offset: int = 0) -> tuple[str, int]:
        """The serial log of the VM's current run from byte ``offset``."""
        record = self.get(name)
        path = self._ctx(record.uuid).serial_log
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

    # -- create / delete ---------------------------------------------------

    def _allowed_file(self, raw: str, what: str) -> Path:
        """Resolve a host path given by an admin; it must sit in image_dirs."""
        path = Path(raw)
        if not path.is_absolute():
            raise InvalidInputError(f"{what} path {raw!r} must be absolute")
        if ".." in path.parts:
            raise InvalidInputError(f"{what} path {raw!r} must not contain '..'")
        real = path.resolve()
        roots = [d.resolve() for d in self.config.image_dirs]
        if not any(real.is_relative_to(root) for root in roots):
            allowed = ", ".join(str(r) for r in roots) or "none configured"
            raise InvalidInputError(
                f"{what} path {raw!r} is outside the allowed image dirs ({allowed}) of host "
                f"{self.config.name!r}: move it there or add its dir to image_dirs"
            )
        if not real.is_file():
            raise NotFoundError(f"{what} {raw!r} does not exist on host {self.config.name!r}")
        return real

    async def _make_disk(self, request: DiskRequest, dst: Path, *, direct: bool) -> DiskSpec:
        qemu_img_bin = self.config.qemu_img
        if request.image is None:
            assert request.size is not None
            await qemu_img.create(dst, request.size, qemu_img=qemu_img_bin)
            return DiskSpec(path=str(dst), size=request.size, direct=direct)
        src = self._allowed_file(request.image, "image")
        src_info = await qemu_img.info(src, qemu_img=qemu_img_bin)
        qemu_img.check_self_contained(src_info, what=f"image {request.image!r}")
        await qemu_img.convert_to_qcow2(
            src, dst, src_format=str(src_info["format"]), qemu_img=qemu_img_bin
        )
        return DiskSpec(path=str(dst), size=int(src_info["virtual-size"]), direct=direct)

    async def create(self, request: CreateVmRequest) -> VmRecord:
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
            disks = [DiskRequest(size=256 * 1024**2)]

        spec = VmSpec(name=name, config_version=version, memory=request.memory, cpus=request.cpus)
        vm_dir = self.vm_dir(spec.uuid)
        disk_dir = vm_dir
        if request.volume is not None:
            volumes = self.catalog.volumes()
            if request.volume not in volumes:
                known = ", ".join(sorted(volumes)) or "none"
                raise NotFoundError(
                    f"no volume named {request.volume!r} on host {self.config.name!r} "
                    f"(known: {known})"
                )
            disk_dir = Path(volumes[request.volume]) / spec.uuid
        vm_dir.mkdir(parents=True)
        disk_dir.mkdir(parents=True, exist_ok=True)
        try:
            kernel = initrd = None
            append = request.append
            if request.guest == "test":
                cache = self.config.guest_cache or default_cache_dir()
                guest = await asyncio.to_thread(ensure_guest, cache)
                kernel, initrd = guest.kernel, guest.initrd
                append = f"{guest.append} {request.append}" if request.append else guest.append
            elif request.kernel:
                kernel = self._allowed_file(request.kernel, "kernel")
                initrd = self._allowed_file(request.initrd, "initrd") if request.initrd else None
            # The VM keeps its own copies, so it stays whole when it moves.
            if kernel is not None:
                await asyncio.to_thread(shutil.copyfile, kernel, vm_dir / "kernel")
            if initrd is not None:
                await asyncio.to_thread(shutil.copyfile, initrd, vm_dir / "initrd")
            on_volume = disk_dir != vm_dir
            disk_specs = [
                await self._make_disk(disk, disk_dir / f"disk{index}.qcow2", direct=on_volume)
                for index, disk in enumerate(disks)
            ]
            spec = spec.model_copy(
                update={
                    "disks": tuple(disk_specs),
                    "kernel": str(vm_dir / "kernel") if kernel else None,
                    "initrd": str(vm_dir / "initrd") if initrd else None,
                    "append": append,
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
        async with self._locks[record.uuid]:
            record = self.get(name)
            if vmstate.is_live(record.state):
                if not force:
                    raise ConflictError(
                        f"VM {name!r} is {record.state.value}: stop it first or use --force"
                    )
                await self._kill_locked(record)
            else:
                await self._kill_leftover(record)
            vmstate.transition(self.get(name).state, VmOp.DELETE, vm=name)
            await self._remove(record, keep_disks=False)
        self._locks.pop(record.uuid, None)
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

    # -- start / stop / kill -----------------------------------------------

    async def _kill_leftover(self, record: VmRecord) -> None:
        """End a QEMU of an off/crashed VM (a panicked guest keeps one)."""
        runtime = self._runtimes.pop(record.uuid, None)
        if runtime is not None:
            runtime.expect_exit = True
            await self._detach(runtime)
        pid = qemu.find_process(self._ctx(record.uuid).pidfile, record.uuid)
        if pid is not None:
            await qemu.kill_process(pid, record.uuid)

    async def start(self, name: str, *, paused: bool = False) -> VmRecord:
        """Start the VM; ``paused`` starts QEMU with the guest not yet running."""
        record = self.get(name)
        async with self._locks[record.uuid]:
            record = self.get(name)
            vmstate.transition(record.state, VmOp.START, vm=name)
            check_host_runs(
                record.spec.config_version,
                self.config.functional_level,
                host=self.config.name,
                vm=name,
            )
            await self._kill_leftover(record)
            # A VM made by replication or failover has no VM dir yet.
            self.vm_dir(record.uuid).mkdir(parents=True, exist_ok=True)
            # A paused start (for a last replication cycle) keeps the console of
            # the run before it: the guest does not run, so nothing is lost.
            ctx = self._ctx(record.uuid).model_copy(
                update={"paused": paused, "serial_append": paused}
            )
            ctx.qmp_socket.unlink(missing_ok=True)
            self.catalog.set_state(record.uuid, VmState.STARTING)
            try:
                pid = await qemu.launch(qemu_argv(record.spec, ctx), pidfile=ctx.pidfile,
                                        uuid=record.uuid, log=ctx.qemu_log)  # fmt: skip
                state = await self._attach(record, pid)
                if paused and state is VmState.STARTING:
                    # -S: QEMU says "prelaunch"; for us the guest is paused.
                    self.catalog.set_state(record.uuid, VmState.PAUSED)
            except BaseException:
                pid_left = qemu.find_process(ctx.pidfile, record.uuid)
                if pid_left is not None:
                    await qemu.kill_process(pid_left, record.uuid)
                self._runtimes.pop(record.uuid, None)
                self.catalog.set_state(record.uuid, VmState.OFF)
                raise
            self._log(record).info("started, QEMU pid %d", pid)
            return self.get(name)

    async def stop(self, name: str, *, timeout: float | None = None) -> tuple[VmRecord, bool]:
        """ACPI power-down; force off after ``timeout``. Returns (record, forced)."""
        record = self.get(name)
        deadline = timeout or self.config.stop_timeout_s
        async with self._locks[record.uuid]:
            record = self.get(name)
            vmstate.transition(record.state, VmOp.STOP, vm=name)
            runtime = self._runtime(record)
            self.catalog.set_state(record.uuid, VmState.STOPPING)
            forced = True
            with contextlib.suppress(QemuError):
                await runtime.channel.execute("system_powerdown")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(runtime.shutdown_seen.wait(), deadline)
                    forced = False
            runtime.expect_exit = True
            if not forced:
                with contextlib.suppress(QemuError):
                    await runtime.channel.execute("quit")
            if forced or not await qemu.wait_gone(runtime.pid, record.uuid, QUIT_GRACE_S):
                await qemu.kill_process(runtime.pid, record.uuid)
            await self._finish_exit(record, runtime, VmState.OFF)
            self._log(record).info("stopped (%s)", "forced" if forced else "clean")
            return self.get(name), forced

    async def pause(self, name: str, *, resume: bool = False) -> VmRecord:
        """Freeze the guest's vCPUs (``stop``) or let them run again (``cont``)."""
        record = self.get(name)
        async with self._locks[record.uuid]:
            record = self.get(name)
            op = VmOp.RESUME if resume else VmOp.PAUSE
            state = vmstate.transition(record.state, op, vm=name)
            await self.channel(record).execute("cont" if resume else "stop")
            self.catalog.set_state(record.uuid, state)
            return self.get(name)

    async def kill(self, name: str) -> VmRecord:
        record = self.get(name)
        async with self._locks[record.uuid]:
            record = self.get(name)
            vmstate.transition(record.state, VmOp.KILL, vm=name)
            await self._kill_locked(record)
            self._log(record).info("killed")
            return self.get(name)

    async def _kill_locked(self, record: VmRecord) -> None:
        runtime = self._runtimes.get(record.uuid)
        if runtime is not None:
            runtime.expect_exit = True
            await qemu.kill_process(runtime.pid, record.uuid)
            await self._finish_exit(record, runtime, VmState.OFF)
        else:
            await self._kill_leftover(record)
            self.catalog.set_state(record.uuid, VmState.OFF)

    @staticmethod
    async def _quit(runtime: _Runtime, uuid: str) -> None:
        """End a QEMU on purpose: ask it to quit, SIGKILL it if it lingers."""
        runtime.expect_exit = True
        with contextlib.suppress(QemuError, TimeoutError):
            await asyncio.wait_for(runtime.channel.execute("quit"), 5)
        if not await qemu.wait_gone(runtime.pid, uuid, QUIT_GRACE_S):
            await qemu.kill_process(runtime.pid, uuid)

    async def _finish_exit(self, record: VmRecord, runtime: _Runtime, state: VmState) -> None:
        self._runtimes.pop(record.uuid, None)
        await self._detach(runtime)
        self._ctx(record.uuid).qmp_socket.unlink(missing_ok=True)
        self.catalog.set_state(record.uuid, state)

    # -- attaching and watching --------------------------------------------

    async def _attach(self, record: VmRecord, pid: int) -> VmState:
        """Connect QMP, learn the true state, and start watching."""
        channel = qemu.QmpChannel(self._ctx(record.uuid).qmp_socket, name=record.name)
        await channel.connect()
        runtime = _Runtime(pid=pid, channel=channel)
        self._runtimes[record.uuid] = runtime
        try:
            status = await channel.status()
        except BaseException:
            self._runtimes.pop(record.uuid, None)
            await channel.close()
            raise
        state = vmstate.state_from_qemu(status)
        if status == "shutdown":
            # The guest powered off while nobody watched; finish the job.
            await self._quit(runtime, record.uuid)
            await self._finish_exit(record, runtime, VmState.OFF)
            return VmState.OFF
        self.catalog.set_state(record.uuid, state)
        runtime.watcher = asyncio.create_task(
            self._watch(record, runtime), name=f"watch-{record.name}"
        )
        return state

    async def _detach(self, runtime: _Runtime) -> None:
        watcher = runtime.watcher
        if watcher is not None and watcher is not asyncio.current_task():
            await cancel_and_wait(watcher)
        await runtime.channel.close()

    async def _watch(self, record: VmRecord, runtime: _Runtime) -> None:
        vm_log = self._log(record)
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
        state = VmState.OFF if runtime.shutdown_seen.is_set() and gone else VmState.CRASHED
        if not gone:
            await qemu.kill_process(runtime.pid, record.uuid)
        vm_log.warning("QEMU pid %d exited unexpectedly; VM is %s", runtime.pid, state.value)
        self._runtimes.pop(record.uuid, None)
        await runtime.channel.close()
        self._ctx(record.uuid).qmp_socket.unlink(missing_ok=True)
        self.catalog.set_state(record.uuid, state)

    async def _handle_events(self, record: VmRecord, runtime: _Runtime) -> None:
        async for event in runtime.channel.events():
            kind = event.get("event")
            if kind == "SHUTDOWN":
                runtime.shutdown_seen.set()
                data: dict[str, Any] = event.get("data") or {}
                current = self.catalog.find(record.uuid)
                if data.get("guest") and current and current.state != VmState.STOPPING:
                    task = asyncio.create_task(self._guest_powered_off(record, runtime))
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)
            elif kind in ("STOP", "RESUME", "GUEST_PANICKED"):
                current = self.catalog.find(record.uuid)
                busy = (VmState.STOPPING, VmState.STARTING, VmState.MIGRATING)
                if current is None or current.state in busy:
                    continue
                with contextlib.suppress(QemuError):
                    status = await runtime.channel.status()
                    if status != "shutdown":
                        self.catalog.set_state(record.uuid, vmstate.state_from_qemu(status))

    async def _guest_powered_off(self, record: VmRecord, runtime: _Runtime) -> None:
        """A guest shut itself down: end its QEMU and record it off."""
        async with self._locks[record.uuid]:
            if self._runtimes.get(record.uuid) is not runtime:
                return
            await self._quit(runtime, record.uuid)
            await self._finish_exit(record, runtime, VmState.OFF)
            self._log(record).info("guest powered off")

    async def upgrade_version(self, name: str) -> VmRecord:
        """Raise the VM's configuration version to this host's level (one way)."""
        record = self.get(name)
        async with self._locks[record.uuid]:
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

    # -- shared volumes ------------------------------------------------------

    def add_volume(self, name: str, path: str) -> dict[str, str]:
        check_name(name, what="volume name")
        root = Path(path)
        if not root.is_absolute() or ".." in root.parts:
            raise InvalidInputError(f"volume path {path!r} must be absolute, without '..'")
        if not root.is_dir():
            raise NotFoundError(f"volume path {path!r} is not a dir on host {self.config.name!r}")
        self.catalog.add_volume(name, str(root.resolve()))
        return self.catalog.volumes()

    # -- for live migration -------------------------------------------------

    def lock(self, uuid: str) -> asyncio.Lock:
        return self._locks[uuid]

    def _runtime(self, record: VmRecord) -> _Runtime:
        runtime = self._runtimes.get(record.uuid)
        if runtime is None:
            raise QemuError(f"VM {record.name!r} has no attached QEMU; 'ferry vm kill' ends it")
        return runtime

    def channel(self, record: VmRecord) -> qemu.QmpChannel:
        return self._runtime(record).channel

    def last_words(self, uuid: str) -> str | None:
        """The first line QEMU wrote to its log in the VM's latest run, if any."""
        return qemu.first_log_line(self.vm_dir(uuid) / QEMU_LOG)

    async def launch_incoming(self, record: VmRecord) -> None:
        """Start QEMU paused, waiting for a migration stream (``-incoming defer``)."""
        ctx = self._ctx(record.uuid, incoming=True)
        ctx.qmp_socket.unlink(missing_ok=True)
        pid = await qemu.launch(qemu_argv(record.spec, ctx), pidfile=ctx.pidfile,
                                uuid=record.uuid, log=ctx.qemu_log)  # fmt: skip
        await self._attach(record, pid)
        self.catalog.set_state(record.uuid, VmState.MIGRATING)

    async def end_qemu(self, record: VmRecord) -> None:
        """End the VM's QEMU on purpose (quit, else kill) without a state change."""
        runtime = self._runtimes.pop(record.uuid, None)
        if runtime is not None:
            await self._quit(runtime, record.uuid)
            await self._detach(runtime)
        await self._kill_leftover(record)
        self._ctx(record.uuid).qmp_socket.unlink(missing_ok=True)

    async def forget(self, record: VmRecord, *, keep_disks: bool) -> None:
        """End the VM's QEMU and remove it from this host (it lives elsewhere now)."""
        self.exit_hooks.pop(record.uuid, None)
        await self.end_qemu(record)
        if self.catalog.find(record.uuid) is not None:
            await self._remove(record, keep_disks=keep_disks)
        else:
            await asyncio.to_thread(shutil.rmtree, self.vm_dir(record.uuid), True)

    async def refresh_process(self, name: str) -> dict[str, Any]:
        """Move a running VM to a fresh QEMU process on this host (new binary).

        A local live migration over a unix socket: the new process starts
        paused with ``-incoming``, the old one sends its memory, the new one
        resumes, the old one quits. Disks stay where they are. Any failure
        before the new process resumed leaves the old one running.
        """
        record = self.get(name)
        async with self._locks[record.uuid]:
            record = self.get(name)
            vmstate.transition(record.state, VmOp.MIGRATE, vm=name)
            old = self._runtime(record)
            final = self._ctx(record.uuid)
            short = _short(record.uuid)
            ctx = final.model_copy(update={
                "incoming": True, "serial_append": True,
                "pidfile": final.pidfile.with_suffix(".new"),
                "qmp_socket": self.config.runtime_dir / f"{short}.new.qmp",
            })  # fmt: skip
            stream = self.config.runtime_dir / f"{short}.mig"
            for path in (ctx.pidfile, ctx.qmp_socket, stream):
                path.unlink(missing_ok=True)
            started = time.monotonic()
            self.catalog.set_state(record.uuid, VmState.MIGRATING)
            new_pid: int | None = None
            new = qemu.QmpChannel(ctx.qmp_socket, name=f"{name}-new")
            resumed = False
            try:
                new_pid = await qemu.launch(qemu_argv(record.spec, ctx), pidfile=ctx.pidfile,
                                            uuid=record.uuid, log=ctx.qemu_log)  # fmt: skip
                await new.connect()
                caps = [{"capability": "events", "state": True},
                        {"capability": "dirty-bitmaps", "state": True}]  # fmt: skip
                await new.execute("migrate-set-capabilities", {"capabilities": caps})
                await new.execute("migrate-incoming", {"uri": f"unix:{stream}"})
                await old.channel.execute("migrate-set-capabilities", {"capabilities": caps})
                await old.channel.execute("migrate-set-parameters", {"max-bandwidth": 0})
                with old.channel.listen("MIGRATION") as events:
                    await old.channel.execute("migrate", {"uri": f"unix:{stream}"})
                    while True:
                        info = await old.channel.execute("query-migrate")
                        if info.get("status") == "completed":
                            break
                        if info.get("status") in ("failed", "cancelled"):
                            reason = info.get("error-desc", info.get("status"))
                            raise QemuError(f"local migration of VM {name!r} failed: {reason}")
                        await events.next(0.2)
                await new.execute("cont")
                resumed = True
            except BaseException:
                if not resumed:
                    with contextlib.suppress(QemuError):
                        await old.channel.execute("migrate_cancel")
                    if new_pid is not None:
                        await qemu.kill_process(new_pid, record.uuid)
                    await new.close()
                    with contextlib.suppress(QemuError):
                        if await old.channel.status() != "running":
                            await old.channel.execute("cont")
                    self.catalog.set_state(record.uuid, VmState.RUNNING)
                raise
            finally:
                stream.unlink(missing_ok=True)
            # The new process runs the guest; retire the old one and take its names.
            await new.close()
            self._runtimes.pop(record.uuid, None)
            await self._quit(old, record.uuid)
            await self._detach(old)
            assert new_pid is not None
            ctx.qmp_socket.rename(final.qmp_socket)
            ctx.pidfile.rename(final.pidfile)
            await self._attach(record, new_pid)
            self._log(record).info("moved to a fresh QEMU, pid %d -> %d", old.pid, new_pid)
            return {"vm": name, "old_pid": old.pid, "pid": new_pid,
                    "downtime_ms": info.get("downtime"),
                    "total_s": round(time.monotonic() - started, 3)}  # fmt: skip

    def outdated_binaries(self) -> builtins.list[str]:
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

    async def reattach_all(self) -> None:
        """On agent start: find every VM's QEMU and record its true state."""
        for record in self.catalog.vms():
            vm_log = self._log(record)
            pid = qemu.find_process(self._ctx(record.uuid).pidfile, record.uuid)
            if pid is None:
                if vmstate.is_live(record.state):
                    # It was meant to run (or to be stopping) and is gone.
                    was_stopping = record.state == VmState.STOPPING
                    state = VmState.OFF if was_stopping else VmState.CRASHED
                    self.catalog.set_state(record.uuid, state)
                    vm_log.warning("QEMU gone while the agent was away; VM is %s", state.value)
                continue
            try:
                state = await self._attach(record, pid)
            except FerryError as exc:
                vm_log.error("cannot re-attach to QEMU pid %d: %s", pid, exc)
                self.catalog.set_state(record.uuid, VmState.CRASHED)
                continue
            vm_log.info("re-attached to QEMU pid %d; VM is %s", pid, state.value)

    async def detach_all(self) -> None:
        """On agent stop: let go of every QEMU and leave them running."""
        for runtime in list(self._runtimes.values()):
            runtime.expect_exit = True  # the connection drop is ours, not a crash
            await self._detach(runtime)
        self._runtimes.clear()
