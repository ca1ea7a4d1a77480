"""Recovery points from a running guest to a replica chain, for real (no agents yet).

The primary side takes a full copy and deltas of a running test guest; each
travels as a delta stream cut into arbitrary network chunks; the replica links
it into a chain. The chain equals the paused disk at every point, a stream
damaged in transit links nothing and a resend works, and retention merges keep
the latest point reading the same.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from uuid import UUID

import pytest

from ferry.adapters.cbt import ChangedBlockTracker
from ferry.adapters.point_transfer import PointReceiver, apply_merge, encode_point, receive_point
from ferry.core.replication import PointInfo, retention_plan
from ferry.core.spec import VmSpec
from ferry.errors import DeltaCorruptError
from tests.integration.conftest import running_guest, same_image, wait_log

pytestmark = pytest.mark.integration


async def chunks(
    stream: Iterable[bytes], seed: int, damage_at: int | None = None
) -> AsyncIterator[bytes]:
    """The stream as a network would deliver it: arbitrary chunk sizes."""
    data = bytearray(b"".join(stream))
    if damage_at is not None:
        data[damage_at % len(data)] ^= 0x40
    rng = random.Random(seed)
    pos = 0
    while pos < len(data):
        size = rng.randint(1, 256 * 1024)
        yield bytes(data[pos : pos + size])
        pos += size
        await asyncio.sleep(0)


def test_points_flow_into_a_replica_chain(guest_spec: VmSpec, tmp_path: Path) -> None:
    primary, replica = tmp_path / "primary", tmp_path / "replica"
    primary.mkdir()
    replica.mkdir()
    disk = Path(guest_spec.disks[0].path)
    uuid = UUID(guest_spec.uuid)
    points: list[PointInfo] = []
    wire_bytes: list[int] = []
    file_bytes: list[int] = []

    async def send(files: list[Path], point_id: int, backing: Path | None,
                   damage_at: int | None = None) -> Path:  # fmt: skip
        target = replica / f"p{point_id}.qcow2"
        receiver = PointReceiver([target], vm_uuid=uuid, point_id=point_id)
        stream = encode_point(files, vm_uuid=uuid, point_id=point_id)
        end = await receive_point(chunks(stream, point_id, damage_at), receiver, [backing])
        wire_bytes.append(end.wire_bytes)
        file_bytes.append(files[0].stat().st_size)
        return target

    async def scenario() -> None:
        async with running_guest(guest_spec, tmp_path) as channel:
            tracker = ChangedBlockTracker(channel, guest_spec.disks, vm="cbt")
            await wait_log(tmp_path, lambda t: t.count("seq ") >= 3)
            await channel.execute("stop")
            (base,) = await tracker.full(primary, "p0")
            latest = await send([base], 0, None)
            assert same_image(latest, disk)
            await channel.execute("cont")
            points.append(PointInfo(id=0, time=0.0, file=latest.name))
            for point_id in (1, 2, 3):
                seen = (await wait_log(tmp_path, lambda t: True)).count("seq ")
                await wait_log(tmp_path, lambda t, n=seen: t.count("seq ") >= n + 4)
                await channel.execute("stop")
                (delta,) = await tracker.delta(primary, f"p{point_id}")
                if point_id == 2:  # damaged in transit: nothing is linked, then a resend
                    with pytest.raises(DeltaCorruptError):
                        await send([delta], point_id, latest, damage_at=5000)
                    assert not list(replica.glob("p2.qcow2*"))
                latest = await send([delta], point_id, latest)
                assert same_image(latest, disk)  # the replica's latest point is the disk
                if point_id < 3:  # after the last point the guest stays paused
                    await channel.execute("cont")
                points.append(PointInfo(id=point_id, time=float(point_id), file=latest.name))

            # Keep 1 point plus the latest: two merges into the base file.
            plan = retention_plan(points, keep=1)
            assert [m.overlay.id for m in plan] == [1, 2]
            for merge in plan:
                await apply_merge(merge, replica)
            assert sorted(p.name for p in replica.iterdir()) == ["p0.qcow2", "p3.qcow2"]
            assert same_image(replica / "p3.qcow2", disk)  # still exactly point 3

    asyncio.run(scenario())
    # Deltas are small next to the full copy: only changed clusters travel.
    # Holes travel as ZERO frames and records compress: the wire carries far
    # less than the delta files hold (about 1-2 KiB per point here).
    assert all(wire < size // 20 for wire, size in zip(wire_bytes, file_bytes, strict=True))
