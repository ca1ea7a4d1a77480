"""Continuous replication's pure rules: the 5 s frequency and its host limit, thinning, RPO."""

import random

import pytest

from ferry.core.replication import (
    MAX_CONTINUOUS_VMS,
    CycleKind,
    CycleRecord,
    PointInfo,
    check_continuous_slot,
    check_extended_frequency,
    is_continuous,
    retention_plan,
    rpo,
    thinning_plan,
)
from ferry.errors import InvalidInputError

HOUR = 3600.0


def chain(times: list[float]) -> list[PointInfo]:
    """A chain oldest first: the base (id 0) and one point per later time."""
    return [PointInfo(i, t, "base" if i == 0 else f"p{i}") for i, t in enumerate(times)]


def survivors(points: list[PointInfo], now: float, in_use: set[int] | None = None) -> list[int]:
    plan = thinning_plan(points, now, in_use=in_use or set())
    dropped = [t.drops.id for t in plan]
    # Each step's neighbours are the points around it at that moment.
    ids = [p.id for p in points]
    for step in plan:
        at = ids.index(step.drops.id)
        assert (ids[at - 1], ids[at + 1]) == (step.onto.id, step.rebase.id)
        del ids[at]
    assert ids == [p.id for p in points if p.id not in dropped]
    return ids


def test_five_seconds_is_continuous_and_limited_per_host() -> None:
    assert is_continuous(5) and not is_continuous(30)
    check_continuous_slot(5, MAX_CONTINUOUS_VMS - 1, host="h1", vm="vm")
    check_continuous_slot(30, 50, host="h1", vm="vm")  # the limit is for 5 s only
    with pytest.raises(InvalidInputError) as info:
        check_continuous_slot(5, MAX_CONTINUOUS_VMS, host="h1", vm="vm11")
    assert str(info.value) == (
        "host 'h1' already replicates 10 VMs continuously (every 5s), the most it runs; "
        "use 30s for VM 'vm11' or slow another VM down first"
    )
    with pytest.raises(InvalidInputError, match="use 5m or 15m"):
        check_extended_frequency(5, 5)


def test_the_last_minute_keeps_every_point() -> None:
    now = 10_000.0
    points = chain([now - 600.5] + [now - 57.5 + 5 * i for i in range(12)])
    assert thinning_plan(points, now) == []


def test_a_point_per_five_minutes_within_the_hour_then_per_hour() -> None:
    now = 100 * HOUR
    times = [now - 5 * HOUR] + [now - 3 * HOUR + 5 * i for i in range(int(3 * HOUR / 5) + 1)]
    points = chain(times)
    kept = survivors(points, now)
    by_id = {p.id: p.time for p in points}
    ages = [now - by_id[i] for i in kept]
    assert kept[0] == 0 and kept[-1] == points[-1].id  # base and latest stay
    recent = [a for a in ages if a <= 60]
    assert len(recent) == len([t for t in times if now - t <= 60])  # all of the last minute
    hour = [by_id[i] for i, a in zip(kept, ages, strict=True) if 60 < a <= HOUR]
    assert len({int(t // 300) for t in hour}) == len(hour)  # at most one per 5-minute slot
    assert 11 <= len(hour) <= 13
    older = [by_id[i] for i, a in zip(kept[1:], ages[1:], strict=True) if a > HOUR]
    assert len({int(t // HOUR) for t in older}) == len(older)
    assert len(older) <= 3
    assert len(kept) < 40  # of 2161 points


def test_thinning_is_stable_as_points_age() -> None:
    """Run after every 5 s cycle, a kept point stays until it ages into the next tier."""
    rng = random.Random(7)
    now = 50 * HOUR
    points = chain([now])
    next_id = 1
    for _ in range(2000):
        now += 5 + rng.uniform(-0.5, 0.5)
        points.append(PointInfo(next_id, now, f"p{next_id}"))
        next_id += 1
        kept = set(survivors(points, now))
        dropped = [p for p in points if p.id not in kept]
        assert all(now - p.time > 60 for p in dropped)  # the last minute is never thinned
        points = [p for p in points if p.id in kept]
        assert len(points) <= 12 + 1 + 13 + 2 + 1
    assert len(points) >= 12 + 11


def test_thinning_skips_points_in_use_and_never_drops_base_or_latest() -> None:
    now = 10 * HOUR
    points = chain([now - 2000 + 5 * i for i in range(10)])  # ids 0..9, all in one 5-min slot
    assert survivors(points, now) == [0, 9]  # the base holds the slot; the latest stays
    assert 4 in survivors(points, now, in_use={4})
    kept = survivors(points, now, in_use={5})  # 5 is rewritten if 4 goes: 4 stays
    assert {4, 5} <= set(kept)
    assert thinning_plan(points[:2], now) == []


def test_count_limit_applies_after_thinning() -> None:
    now = 10 * HOUR
    points = chain([now - 2000] + [now - 59 + 5 * i for i in range(12)])
    kept = [p for p in points if p.id in set(survivors(points, now))]
    merges = retention_plan(kept, 4)
    assert len(kept) - len(merges) == 5


def ok(started: float, duration: float) -> CycleRecord:
    return CycleRecord(started, True, CycleKind.SUCCESS, 1, duration)


def test_rpo_now_and_p99_of_its_peaks() -> None:
    assert rpo([], 100.0).rpo_s is None
    cycles = [ok(5.0 * i, 1.0) for i in range(100)]  # every 5 s, 1 s each
    now = 5.0 * 99 + 2.0
    got = rpo(cycles, now)
    assert got.rpo_s == pytest.approx(2.0)
    assert got.rpo_p99_s == pytest.approx(6.0)  # landed 1 s after the next cut
    slow = [*cycles[:50], ok(250.0, 20.0), *[ok(5.0 * i + 20, 1.0) for i in range(51, 100)]]
    assert rpo(slow, now).rpo_p99_s == pytest.approx(25.0)  # one 20 s cycle shows
    missed = [*cycles, CycleRecord(500.0, False, CycleKind.MISS, 0, 0.0)]
    assert rpo(missed, 530.0).rpo_s == pytest.approx(35.0)
    assert rpo(missed, 530.0, window_s=60).rpo_p99_s == pytest.approx(35.0)  # the open peak
    # Peaks that ended before the window are left out.
    assert rpo(slow, now + 2000, window_s=100).rpo_p99_s == pytest.approx(now + 2000 - 515.0)
