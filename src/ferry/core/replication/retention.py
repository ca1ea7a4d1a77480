"""Recovery point retention on a replica: how many points to keep, and the merges that keep them."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from itertools import pairwise

from ferry.errors import InvalidInputError

DEFAULT_RECOVERY_POINTS = 4
MAX_RECOVERY_POINTS = 24


def check_recovery_points(n: int) -> int:
    """Validate how many recovery points to keep besides the latest (0..24)."""
    if not 0 <= n <= MAX_RECOVERY_POINTS:
        raise InvalidInputError(
            f"invalid number of recovery points {n}: use 0..{MAX_RECOVERY_POINTS} "
            "(the latest point is always kept on top of these)"
        )
    return n


@dataclass(frozen=True)
class PointInfo:
    """One recovery point on the replica: ``file`` reads as the VM's disk at ``time``.

    ``id`` is the point's sequence number within the relationship (the
    ``point_id`` of its delta stream); later points have larger ids.
    """

    id: int
    time: float
    file: str
    size: int = 0


@dataclass(frozen=True)
class Merge:
    """One retention step: fold the oldest overlay into the base file.

    Before the step, ``base_file`` reads as point ``drops`` (the oldest point),
    ``overlay.file`` is a qcow2 whose backing file is ``base_file``, and
    ``rebase.file`` (if any) is a qcow2 whose backing file is ``overlay.file``.
    After it, ``base_file`` reads as point ``overlay``, ``drops`` is gone and
    ``overlay.file`` no longer exists. The adapter runs, in this order:

    1. catalog: point ``drops.id`` is gone (never offered for failover again),
       because step 2 changes what ``base_file`` reads.
    2. ``qemu-img commit -d -f qcow2 {overlay.file}``: writes the overlay's
       clusters into its backing file, ``base_file``. ``-d`` leaves the overlay
       as it was, so ``overlay.file`` still reads the same (its own clusters,
       the rest from a base that did not change there) and a crash here
       leaves a valid chain; redoing the commit writes the same bytes.
    3. when ``rebase`` is not None: ``qemu-img rebase -u -b {base_file} -F qcow2
       {rebase.file}``. Metadata only, and safe because ``base_file`` now reads
       exactly what ``overlay.file`` read. ``rebase`` is None only when the
       overlay was the latest point (``keep=0``): nothing sits on top of it.
    4. catalog: point ``overlay.id`` lives in ``base_file``.
    5. delete ``overlay.file``.

    A plan of several merges runs them in order; each merge's ``drops`` is the
    previous one's ``overlay`` and they share ``base_file``.
    """

    base_file: str
    drops: PointInfo
    overlay: PointInfo
    rebase: PointInfo | None


def retention_plan(
    points: Sequence[PointInfo], keep: int, *, in_use: Collection[int] = frozenset()
) -> list[Merge]:
    """The merges that leave ``keep`` points plus the latest, oldest first.

    ``points`` is the chain oldest first: ``points[0]`` is the base (a full
    image), each later one an overlay on the one before, the last the latest.
    ``in_use`` are ids of points a test failover VM is booted on: a merge that
    would drop, delete or rebase one of them waits (with every merge after it,
    as merges must run in order) until the test ends.
    """
    check_recovery_points(keep)
    ids = [p.id for p in points]
    if any(a >= b for a, b in pairwise(ids)):
        raise InvalidInputError(f"recovery points must be oldest first with rising ids, got {ids}")
    if not points:
        return []
    base_file = points[0].file
    plan: list[Merge] = []
    for i in range(1, len(points) - keep):
        drops, overlay = points[i - 1], points[i]
        rebase = points[i + 1] if i + 1 < len(points) else None
        touched = {drops.id, overlay.id} | ({rebase.id} if rebase else set())
        if touched & set(in_use):
            break
        plan.append(Merge(base_file=base_file, drops=drops, overlay=overlay, rebase=rebase))
    return plan


# Continuous replication thins its points as they age (age limit, spacing):
# every point of the last minute, one per 5 minutes for the last hour, then
# one per hour; the count limit (``recovery_points``) applies after thinning.
THINNING_TIERS: tuple[tuple[float, float], ...] = ((60.0, 0.0), (3600.0, 300.0))
THINNING_OLDER_SPACING_S = 3600.0


@dataclass(frozen=True)
class Thin:
    """One thinning step: drop point ``drops`` from the middle of the chain.

    Before the step ``drops.file`` is backed by ``onto.file`` and
    ``rebase.file`` by ``drops.file``. The adapter runs, in this order:

    1. ``qemu-img rebase -b {onto.file} -F qcow2 {rebase.file}`` (the safe
       rebase): the clusters of ``drops`` that ``rebase`` does not hide are
       copied into ``rebase.file``, which reads the same before, during and
       after (a rebase cut short leaves it on ``drops.file`` with some clusters
       it read through it anyway); ``drops`` still reads as it did.
    2. catalog: point ``drops.id`` is gone.
    3. delete ``drops.file`` (a crash before it leaves an unlisted file).

    Every step is repeatable. Neither the base nor the latest point is ever
    dropped this way.
    """

    drops: PointInfo
    onto: PointInfo
    rebase: PointInfo


def _spacing(age: float) -> float:
    for limit, spacing in THINNING_TIERS:
        if age <= limit:
            return spacing
    return THINNING_OLDER_SPACING_S


def thinning_plan(
    points: Sequence[PointInfo], now: float, *, in_use: Collection[int] = frozenset()
) -> list[Thin]:
    """The points continuous replication drops as they age, oldest first.

    A point whose age puts it in a tier with a spacing (5 minutes within the
    hour, an hour beyond) is kept only if it is the oldest point of its slot
    (``time // spacing``) in that tier; slots are fixed in time, so a point
    that was kept stays kept until it ages into the next tier. The base and
    the latest point always stay; a step that would drop, or rewrite, a point
    in ``in_use`` is skipped (that point stays).
    """
    chain = list(points)
    seen: set[tuple[float, int]] = set()
    if chain and (base_spacing := _spacing(now - chain[0].time)) > 0.0:
        seen.add((base_spacing, int(chain[0].time // base_spacing)))  # the base holds its slot
    plan: list[Thin] = []
    i = 1
    while i < len(chain) - 1:
        point = chain[i]
        spacing = _spacing(now - point.time)
        if spacing == 0.0:
            i += 1
            continue
        slot = (spacing, int(point.time // spacing))
        first_in_slot = slot not in seen
        seen.add(slot)
        onto, rebase = chain[i - 1], chain[i + 1]
        if first_in_slot or {point.id, onto.id, rebase.id} & set(in_use):
            i += 1
            continue
        plan.append(Thin(drops=point, onto=onto, rebase=rebase))
        del chain[i]
    return plan
