"""The destination's QMP sequence: wait for a VM's streams, then resume it.

A QEMU started with ``-incoming defer`` (paused) is made ready to receive
(DESIGN.md section 4, libvirt's order): migration capabilities, with TLS a
server credential and an ``authz-simple`` object that admits only the source
host's DN, for a disk copy an NBD server exporting every disk writable, and
last ``migrate-incoming`` on a free port. At switch-over it is asked, not
assumed, to have loaded the whole stream before the NBD server stops and the
guest continues.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.adapters.migration.channel import LOADING, Channel, MigrationStatus, query_migrate
from ferry.core.vmstate import QemuStatus
from ferry.errors import QemuError

log = logging.getLogger(__name__)

SETTLE_S = 30.0  # how long the destination may take to load the last state


def free_port(address: str) -> int:
    """A TCP port nobody listens on at ``address`` now (QEMU binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class IncomingEndpoints:
    """Where the source sends the memory stream, and the disks (NBD) if copied."""

    uri: str
    nbd: tuple[str, int] | None


async def receive(
    channel: Channel,
    *,
    tag: str,
    address: str,
    tls_dir: Path | None,
    source_dn: str,
    disks: int,
    postcopy: bool = False,
) -> IncomingEndpoints:
    """Make the paused incoming QEMU wait for the streams; where they go.

    ``tag`` makes QEMU object ids unique to the move; ``tls_dir`` None means
    plain TCP; ``disks`` is how many disks to export over NBD (0: shared);
    ``postcopy``: the source may switch to post-copy (both sides need it).
    """
    caps = [{"capability": "events", "state": True},
            {"capability": "dirty-bitmaps", "state": True}]  # fmt: skip
    if postcopy:
        caps.append({"capability": "postcopy-ram", "state": True})
    await channel.execute("migrate-set-capabilities", {"capabilities": caps})
    tls_id, authz_id = f"ferry-tls-{tag}", f"ferry-authz-{tag}"
    if tls_dir is not None:
        await channel.execute("object-add", {
            "qom-type": "tls-creds-x509", "id": tls_id, "endpoint": "server",
            "dir": str(tls_dir), "verify-peer": True})  # fmt: skip
        await channel.execute("object-add", {
            "qom-type": "authz-simple", "id": authz_id, "identity": source_dn})  # fmt: skip
    nbd = None
    if disks:
        port = free_port(address)
        args: dict[str, Any] = {"addr": {"type": "inet", "data": {
            "host": address, "port": str(port)}}}  # fmt: skip
        if tls_dir is not None:
            args.update({"tls-creds": tls_id, "tls-authz": authz_id})
        await channel.execute("nbd-server-start", args)
        for index in range(disks):
            await channel.execute("block-export-add", {
                "type": "nbd", "id": f"export{index}", "node-name": f"disk{index}",
                "name": f"disk{index}", "writable": True})  # fmt: skip
        nbd = (address, port)
    if tls_dir is not None:
        await channel.execute("migrate-set-parameters",
                              {"tls-creds": tls_id, "tls-authz": authz_id})  # fmt: skip
    uri = f"tcp:{address}:{free_port(address)}"
    await channel.execute("migrate-incoming", {"uri": uri})
    return IncomingEndpoints(uri, nbd)


async def settled(channel: Channel, timeout: float = SETTLE_S) -> MigrationStatus:
    """Wait until the incoming side has loaded the whole stream; its status.

    The source reports ``completed`` once it has sent its last byte; this
    side is still loading device state and activating its images then
    (longer with every disk), so it must be asked, not assumed, to be done.
    """
    deadline = time.monotonic() + timeout
    with channel.listen("MIGRATION") as events:
        while True:
            status = (await query_migrate(channel)).status
            if status not in LOADING or time.monotonic() > deadline:
                return status
            await events.next(0.05)


# The incoming side may run the guest: the whole state loaded, or (post-copy)
# the device state is coming and the pages follow on demand ('cont' while still
# loading only sets autostart; QEMU starts the vCPUs once the device state is in).
RUNNABLE = frozenset({MigrationStatus.COMPLETED, MigrationStatus.POSTCOPY_ACTIVE})


# QEMU's own announce timing (its migration defaults): five rounds, 50 ms
# first, 100 ms more each round, at most 550 ms apart.
ANNOUNCE = {"initial": 50, "max": 550, "rounds": 5, "step": 100}


async def autostart(channel: Channel) -> None:
    """Let QEMU run the guest by itself the moment the stream has loaded.

    ``cont`` on a QEMU still in ``inmigrate`` only sets its autostart flag:
    QEMU then starts the vCPUs as the last step of a successful load (or, in
    post-copy, once the device state is in), with no round trip between the
    load and the run. A load that fails never runs the guest.
    """
    await channel.execute("cont")


async def resume(channel: Channel, *, nbd: bool, announce: bool = False) -> None:
    """Switch-over done: stop exporting the disks (``nbd``) and run the guest.

    ``announce`` (a VM with NICs): once it runs, QEMU sends RARP frames for
    each NIC's MAC (and asks a virtio guest to announce itself), so switches
    learn the VM's new port at once. QEMU announces by itself at the end of
    an incoming migration, but the VM is still paused then (``-S``), and a
    paused VM's frames only queue (DESIGN.md section 5), so it is asked again
    after ``cont``.
    """
    if nbd:
        await channel.execute("nbd-server-stop")
    if await channel.status() is not QemuStatus.RUNNING:  # autostart may have run it
        await channel.execute("cont")
    if announce:
        try:
            await channel.execute("announce-self", dict(ANNOUNCE))
        except QemuError as exc:  # the guest runs here now: a late switch learning is no undo
            log.warning("announce-self after the switch-over failed: %s", exc)
