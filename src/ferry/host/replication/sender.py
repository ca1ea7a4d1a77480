"""What a sending host gives a receiving one: the offer of a VM, and its recovery points.

The sender is a primary (to its replica), a replica host (to its extended
host, or to the host its replica VM moves to). The receiver takes each the
same way, through :mod:`ferry.peer.replication`:

* :func:`offer_replica`: the version rule first (the receiver runs the
  sender's functional level or newer), then the offer, then the VM's kernel
  and initrd, so the receiver can boot the VM without the sender;
* :class:`PointSender`: one recovery point as a delta stream
  (:mod:`ferry.core.delta_stream`), within the host-wide bandwidth cap
  (``replication_max_bandwidth``). One instance per host, shared by every
  sender, so the cap holds for all of them together.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from uuid import UUID

from ferry.adapters.point_transfer import encode_point
from ferry.core import replication as rules
from ferry.core.rate import TokenBucket
from ferry.core.relationship import InitialMethod
from ferry.core.spec import VmSpec
from ferry.errors import FerryError, error_from_code
from ferry.host.config import HostConfig
from ferry.host.jobs import Job, JobRegistry
from ferry.peer.client import PeerClient
from ferry.peer.replication import FILE, HELLO, OFFER, POINT, REMOVE, Offer, PointLinked

log = logging.getLogger(__name__)


async def offer_replica(peer: PeerClient, spec: VmSpec, *, sender: str, level: int,
                        frequency_s: int, recovery_points: int,
                        initial: InitialMethod = InitialMethod.NETWORK, primary_url: str,
                        origin: str = "", origin_url: str = "",
                        network_map: Mapping[str, str] | None = None,
                        cluster: str = "") -> str:  # fmt: skip
    """Offer VM ``spec`` to ``peer``'s host; returns its certificate thumbprint to pin.

    ``cluster``: the replica broker's target cluster (``peer`` reaches its nodes);
    the thumbprint returned is then that of the CA that issued them.

    ``origin``: for an extension, the VM's own primary (``sender`` is then
    its replica host). ``network_map``: the VM's networks -> the receiver's
    (the receiver refuses the offer, one line, if it lacks one).
    """
    hello = await peer.call(HELLO)
    rules.check_replica_accepts(level, hello.functional_level, primary=sender,
                                replica=peer.name, vm=spec.name)  # fmt: skip
    thumbprint = peer.thumbprint or ""
    offer = Offer(spec=spec, frequency_s=frequency_s, recovery_points=recovery_points,
                  functional_level=level, initial=initial, primary_url=primary_url,
                  origin=origin, origin_url=origin_url,
                  network_map=dict(network_map or {}), cluster=cluster)  # fmt: skip
    state = await peer.call(OFFER, offer)
    try:
        for kind in ("kernel", "initrd"):
            path = getattr(spec, kind)
            if path and Path(path).exists():
                data = await asyncio.to_thread(Path(path).read_bytes)
                await peer.call(FILE, data=data, uuid=spec.uuid, kind=kind)
    except FerryError as exc:
        if state.latest_point is not None:  # it holds data (adopted, or a resent offer): kept
            raise
        # The receiver recorded a replica VM the sender will not know of: withdraw it.
        try:
            await peer.call(REMOVE, uuid=spec.uuid)
        except FerryError as undo:
            log.warning("VM %s: the offer to %s was not withdrawn: %s", spec.name, peer.name, undo)
            raise exc from None
        raise error_from_code(exc.code, f"{exc}; the offer was withdrawn, nothing was kept "
                                        f"on host {peer.name!r}") from exc  # fmt: skip
    return thumbprint


class PointSender:
    """Streams recovery points to receiving hosts, all within this host's bandwidth cap."""

    def __init__(self, config: HostConfig, jobs: JobRegistry) -> None:
        self.jobs = jobs
        self._bucket = TokenBucket(config.replication_max_bandwidth, now=time.monotonic())
        self._corrupt_streams = config.corrupt_replication_streams

    async def send(self, peer: PeerClient, vm_uuid: str, point_id: int, point_time: float,
                   files: list[Path], *, compress: bool, job: Job | None = None,
                   app_consistent: bool = False) -> tuple[PointLinked, int]:  # fmt: skip
        """PUT one point's files as a delta stream (one file per disk).

        Returns the receiver's answer and the bytes that crossed the wire;
        ``job`` gets the progress. ``app_consistent``: the point was cut with
        the guest's file systems frozen (the query says so to the receiver).
        """
        total = sum(f.stat().st_size for f in files)
        corrupt = self._corrupt_streams > 0
        if corrupt:
            self._corrupt_streams -= 1
        counter = [0]
        body = self._stream(files, vm_uuid, point_id, total, counter, job, compress=compress,
                            corrupt=corrupt)  # fmt: skip
        query = {"time": repr(point_time)}
        if app_consistent:
            query["app_consistent"] = "1"
        reply = await peer.call(POINT, data=body, query=query, uuid=vm_uuid,
                                id=str(point_id))  # fmt: skip
        return reply, counter[0]

    async def _stream(self, files: list[Path], vm_uuid: str, point_id: int, total: int,
                      counter: list[int], job: Job | None, *, compress: bool,
                      corrupt: bool) -> AsyncIterator[bytes]:  # fmt: skip
        frames: Iterator[bytes] = encode_point(
            files, vm_uuid=UUID(vm_uuid), point_id=point_id, compress=compress
        )
        done = object()
        # One frame ahead: the next is read and compressed in a thread while
        # this one goes out, so the disk, zstd and the TLS socket overlap.
        ahead = asyncio.ensure_future(asyncio.to_thread(next, frames, done))
        try:
            while True:
                frame = await ahead
                if frame is done:
                    return
                ahead = asyncio.ensure_future(asyncio.to_thread(next, frames, done))
                assert isinstance(frame, bytes)
                if corrupt and len(frame) > 200:
                    # Test hook (corrupt_replication_streams): damage one payload byte.
                    frame = frame[:150] + bytes([frame[150] ^ 0xFF]) + frame[151:]
                    corrupt = False
                wait = self._bucket.reserve(len(frame), time.monotonic())
                if wait > 0:
                    await asyncio.sleep(wait)
                counter[0] += len(frame)
                if job is not None:
                    self.jobs.update(job, progress={"bytes": min(counter[0], total),
                                                    "total": total})  # fmt: skip
                yield frame
        finally:
            if not ahead.done():  # the thread still holds the encoder: let it finish
                await asyncio.wait([ahead])
