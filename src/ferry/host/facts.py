"""What a host is: its resources, QEMU and the accelerator it really has.

``accelerator = "auto"`` does not trust ``/dev/kvm`` alone: on nested hosts
QEMU starts fine with KVM and the guest never boots (DESIGN.md section 4). So
auto boots the test guest under KVM once with a short deadline and caches the
verdict in the data dir, keyed by kernel release and QEMU version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

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
