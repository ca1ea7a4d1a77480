"""Refreshing a running VM's process: a local live migration to a fresh QEMU.

``ferry host refresh-vms`` uses it after a QEMU upgrade: the new process
starts paused with ``-incoming`` on a unix socket, the old one sends its
memory, the new one resumes, the old one quits and the new one takes its
pidfile and QMP socket. Disks stay where they are. Any failure before the new
process resumed leaves the old one running. In the VM's states it is a move
that arrives where it started: ``running -> migrating -> running``.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from functools import partial
from typing import Any

from ferry.adapters import qemu
from ferry.adapters.catalog import VmRecord
from ferry.core import vmstate
from ferry.core.vmstate import QemuStatus, VmOp
from ferry.errors import QemuError
from ferry.host.vms.process import Runtime, VmProcesses, short_name, vm_logger

log = logging.getLogger(__name__)

_CAPABILITIES = [
    {"capability": "events", "state": True},
    {"capability": "dirty-bitmaps", "state": True},
    # A QEMU that was the source of a move that failed keeps the move's
    # capability; with it this stream would wait at pre-switchover forever.
    {"capability": "pause-before-switchover", "state": False},
]
# A QEMU that arrived by a move keeps that move's TLS parameters (a server
# endpoint, unusable to send): this stream is a local unix socket, no TLS.
_NO_TLS = {"tls-creds": "", "tls-hostname": "", "tls-authz": ""}


async def refresh_process(processes: VmProcesses, record: VmRecord) -> dict[str, Any]:
    """Move the running VM to a fresh QEMU on this host; the caller holds its lock."""
    name = record.name
    vmstate.transition(record.state, VmOp.MIGRATE, vm=name)
    old = processes.runtime(record)
    final = processes.context(record.uuid)
    short = short_name(record.uuid)
    runtime_dir = processes.config.runtime_dir
    # The old QEMU holds its taps until it quits: the new one takes the other names.
    slot = 1 - await processes.networks.slot_of(record.spec) if record.spec.nics else 0
    # QEMU removes its pidfile and sockets by the names it was given when it quits: a
    # QEMU that came from an earlier refresh would take a fixed ".new" name from its
    # successor as it quits, so each refresh names its files afresh.
    tag = f"new-{secrets.token_hex(4)}"
    ctx = final.model_copy(update={
        "incoming": True, "serial_append": True,
        "pidfile": final.pidfile.with_suffix(f".{tag}"),
        "qmp_socket": runtime_dir / f"{short}.{tag}.qmp",
        "vnc_socket": runtime_dir / f"{short}.{tag}.vnc",
        "tap_slot": slot,
    })  # fmt: skip
    stream = runtime_dir / f"{short}.mig"
    for path in (ctx.pidfile, ctx.qmp_socket, stream):
        path.unlink(missing_ok=True)
    started = time.monotonic()
    processes.states.apply(record, VmOp.MIGRATE)
    new_pid: int | None = None
    new = qemu.QmpChannel(ctx.qmp_socket, name=f"{name}-new")
    resumed = False
    try:
        new_pid = await processes.launch(record, ctx)
        await new.connect()
        await new.execute("migrate-set-capabilities", {"capabilities": _CAPABILITIES})
        await new.execute("migrate-incoming", {"uri": f"unix:{stream}"})
        await old.channel.execute("migrate-set-capabilities", {"capabilities": _CAPABILITIES})
        await old.channel.execute("migrate-set-parameters", {"max-bandwidth": 0, **_NO_TLS})
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
            await _take_back(processes, record, old, new, new_pid)
            for left in (ctx.pidfile, ctx.qmp_socket, ctx.vnc_socket):
                if left is not None:
                    left.unlink(missing_ok=True)
        raise
    finally:
        stream.unlink(missing_ok=True)
    # The new process runs the guest; retire the old one and take its names.
    await new.close()
    processes.take(record.uuid)
    await processes.quit(old, record.uuid)
    await processes.detach(old)
    assert new_pid is not None
    ctx.qmp_socket.rename(final.qmp_socket)
    if record.spec.display == "vnc" and ctx.vnc_socket and final.vnc_socket:
        ctx.vnc_socket.rename(final.vnc_socket)
    ctx.pidfile.rename(final.pidfile)
    await processes.attach(record, new_pid, partial(vmstate.confirmed, VmOp.ARRIVED))
    vm_logger(log, record).info("moved to a fresh QEMU, pid %d -> %d", old.pid, new_pid)
    return {"vm": name, "old_pid": old.pid, "pid": new_pid,
            "downtime_ms": info.get("downtime"),
            "total_s": round(time.monotonic() - started, 3)}  # fmt: skip


async def _take_back(
    processes: VmProcesses,
    record: VmRecord,
    old: Runtime,
    new: qemu.QmpChannel,
    new_pid: int | None,
) -> None:
    """The refresh failed before the new QEMU resumed: the old one runs the guest on."""
    with contextlib.suppress(QemuError):
        await old.channel.execute("migrate_cancel")
    if new_pid is not None:
        await qemu.kill_process(new_pid, record.uuid)
    await new.close()
    status: QemuStatus | None = None
    with contextlib.suppress(QemuError):
        if await old.channel.status() is not QemuStatus.RUNNING:
            await old.channel.execute("cont")
        status = await old.channel.status()
    # Unreachable, the old QEMU is gone: its watcher records that it crashed.
    if status is not None:
        processes.states.apply(record, vmstate.confirmed(VmOp.MIGRATE_ABORTED, status))
