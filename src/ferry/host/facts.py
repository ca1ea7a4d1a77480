"""What a host is: its resources, QEMU, the accelerator it really has and its CPU models.

``accelerator = "auto"`` does not trust ``/dev/kvm`` alone: on nested hosts
QEMU starts fine with KVM and the guest never boots (DESIGN.md section 4). So
auto boots the test guest under KVM once with a short deadline and caches the
verdict in the data dir, keyed by kernel release and QEMU version. The CPU
models the host runs (QEMU's ``query-cpu-definitions`` under that
accelerator) are probed the same way once per agent start and cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import platform
import subprocess
import tempfile
import time
import uuid as uuidlib
from collections.abc import AsyncIterator
from pathlib import Path

from ferry.adapters import qemu
from ferry.core.cpu_models import CpuFacts, parse_definitions
from ferry.errors import FerryError, QemuError
from ferry.guest.build import default_cache_dir, ensure_guest
from ferry.host.config import HostConfig

log = logging.getLogger(__name__)

PROBE_FILE = "accelerator.json"
PROBE_DEADLINE_S = 20.0


def host_memory() -> int:
    with Path("/proc/meminfo").open() as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise FerryError("cannot read MemTotal from /proc/meminfo")


def host_cpus() -> int:
    return len(os.sched_getaffinity(0))


def qemu_version(qemu_binary: str) -> str:
    try:
        out = subprocess.run(
            [qemu_binary, "--version"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise QemuError(
            f"cannot run {qemu_binary}: {exc}; install QEMU (apt-get install -y qemu-system-x86)"
        ) from exc
    first = out.splitlines()[0] if out else ""
    return first.removeprefix("QEMU emulator version ").strip()


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


async def probe_kvm_boots(config: HostConfig) -> bool:
    """Boot the test guest under KVM; True if it says it is up in time."""
    guest = await asyncio.to_thread(ensure_guest, config.guest_cache or default_cache_dir())
    with tempfile.TemporaryDirectory(prefix="ferry-kvm-probe-") as tmp:
        log_path = Path(tmp) / "serial.log"
        argv = [
            config.qemu_binary, "-nodefaults", "-no-user-config", "-display", "none",
            "-machine", "q35,accel=kvm", "-cpu", "max", "-m", "256M", "-nic", "none",
            "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
            "-append", guest.append, "-serial", f"file:{log_path}",
        ]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + PROBE_DEADLINE_S
            while time.monotonic() < deadline and proc.returncode is None:
                with contextlib.suppress(OSError):
                    if b"ferry-guest up" in log_path.read_bytes():
                        return True
                await asyncio.sleep(0.2)
            if proc.returncode is None:
                log.warning("KVM probe: the guest did not come up within %.0fs", PROBE_DEADLINE_S)
            return False
        finally:
            if proc.returncode is None:
                proc.kill()
            assert proc.stderr is not None
            errors = (await proc.stderr.read()).decode(errors="replace").strip().splitlines()
            await proc.wait()
            if errors:
                log.warning("KVM probe: QEMU said: %s", errors[0])


async def resolve_accelerator(config: HostConfig) -> str:
    """The accelerator VMs on this host use: the configured one, or the probe's."""
    if config.accelerator != "auto":
        return config.accelerator
    if not kvm_usable():
        return "tcg"
    key = f"{platform.release()} {qemu_version(config.qemu_binary)}"
    cache = config.data_dir / PROBE_FILE
    with contextlib.suppress(OSError, ValueError, KeyError):
        cached = json.loads(cache.read_text())
        if cached["key"] == key:
            return str(cached["accelerator"])
    try:
        verdict = "kvm" if await probe_kvm_boots(config) else "tcg"
    except FerryError as exc:
        log.warning("KVM probe could not run (%s); using tcg", exc)
        return "tcg"
    log.info("KVM probe: guests %s under KVM here; using %s",
             "boot" if verdict == "kvm" else "do not boot", verdict)  # fmt: skip
    cache.write_text(json.dumps({"key": key, "accelerator": verdict}))
    return verdict


CPU_PROBE_FILE = "cpu_models.json"


def _cpu_flags_digest() -> str:
    """The host CPU's flags: a new CPU (or microcode hiding a feature) is a new probe."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return hashlib.sha256(line.encode()).hexdigest()[:16]
    return "unknown"


@contextlib.asynccontextmanager
async def bare_qemu(qemu_binary: str, *, name: str,
                    accelerator: str | None = None) -> AsyncIterator[qemu.QmpChannel]:  # fmt: skip
    """A QMP channel to a QEMU that runs no guest (``-machine none``, paused), ended on exit."""
    marker = str(uuidlib.uuid4())
    accel = ["-accel", accelerator] if accelerator else []
    with tempfile.TemporaryDirectory(prefix=f"ferry-{name}-") as tmp:
        pidfile, sock = Path(tmp) / "qemu.pid", Path(tmp) / "qmp.sock"
        argv = [
            qemu_binary, "-nodefaults", "-no-user-config", "-display", "none",
            "-machine", "none", *accel, "-S", "-uuid", marker,
            "-daemonize", "-pidfile", str(pidfile),
            "-chardev", f"socket,id=qmp,path={sock},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
        ]  # fmt: skip
        pid = await qemu.launch(argv, pidfile=pidfile, uuid=marker, timeout=30)
        channel = qemu.QmpChannel(sock, name=name)
        try:
            await channel.connect()
            yield channel
        finally:
            await channel.close()
            await qemu.kill_process(pid, marker)


async def query_cpu_definitions(qemu_binary: str, accelerator: str) -> list[dict[str, object]]:
    """QEMU's ``query-cpu-definitions`` under ``accelerator``, from a QEMU that runs no guest."""
    async with bare_qemu(qemu_binary, name="cpu-probe", accelerator=accelerator) as channel:
        reply = await channel.execute("query-cpu-definitions")
    if not isinstance(reply, list):
        raise QemuError(f"query-cpu-definitions answered {type(reply).__name__}, not a list")
    return [dict(entry) for entry in reply]


async def probe_cpu_models(config: HostConfig, accelerator: str) -> CpuFacts:
    """The CPU models this host runs under ``accelerator``: probed, or read from the cache.

    The cache (``cpu_models.json`` in the data dir) holds QEMU's answer keyed by
    kernel release, QEMU version, accelerator and the host CPU's flags; the
    host.toml ``cpu_models`` list narrows it each time. A probe that fails
    leaves the facts empty (nothing refused) with a warning: the VMs' own
    start then says what QEMU lacks.
    """
    key = (f"{platform.release()} {qemu_version(config.qemu_binary)} {accelerator} "
           f"{_cpu_flags_digest()}")  # fmt: skip
    cache = config.data_dir / CPU_PROBE_FILE
    reply: list[dict[str, object]] | None = None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        cached = json.loads(cache.read_text())
        if cached["key"] == key:
            reply = list(cached["definitions"])
    if reply is None:
        try:
            reply = await query_cpu_definitions(config.qemu_binary, accelerator)
        except FerryError as exc:
            log.warning("CPU model probe failed (%s); CPU models are not checked here", exc)
            return CpuFacts(host=config.name)
        slim = [{"name": e["name"], "unavailable-features": e.get("unavailable-features", [])}
                for e in reply]  # fmt: skip
        cache.write_text(json.dumps({"key": key, "definitions": slim}))
        log.info("CPU model probe: %d models, %d runnable under %s", len(reply),
                 sum(not e.get("unavailable-features") for e in reply), accelerator)  # fmt: skip
    return CpuFacts(host=config.name, models=parse_definitions(reply, allowed=config.cpu_models))
