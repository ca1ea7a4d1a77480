import random
from itertools import pairwise

import pytest

from ferry.core.replication import (
    DEFAULT_FREQUENCY,
    DEFAULT_RECOVERY_POINTS,
    INITIAL_STATE,
    MAX_RECOVERY_POINTS,
    TRANSITIONS,
    CycleRecord,
    Health,
    Merge,
    PointInfo,
    ReplicationOp,
    ReplicationState,
    assess_health,
    check_frequency,
    check_recovery_points,
    check_replica_accepts,
    check_reverse_allowed,
    format_frequency,
    health,
    is_missed,
    is_running,
    latest_point_time,
    missed_slots,
    next_due,
    parse_frequency,
    retention_plan,
    statistics,
    transition,
)
from ferry.errors import InvalidInputError, StateError, VersionError

St = ReplicationState
Op = ReplicationOp

# ------------------------------------------------------------------ life cycle


def test_a_relationship_walks_from_initial_copy_to_removal() -> None:
    state = INITIAL_STATE
    assert state is St.INITIAL_COPY
    for op, expected in [
        (Op.INITIAL_COPY_DONE, St.REPLICATING),
        (Op.BITMAP_LOST, St.RESYNCHRONISING),
        (Op.BITMAP_LOST, St.RESYNCHRONISING),
        (Op.RESYNC_DONE, St.REPLICATING),
        (Op.PAUSE, St.PAUSED),
        (Op.RESUME, St.REPLICATING),
        (Op.FAIL, St.ERROR),
        (Op.RESUME, St.REPLICATING),
        (Op.FAILOVER, St.FAILED_OVER),
        (Op.REVERSE, St.INITIAL_COPY),
        (Op.REMOVE, St.REMOVED),
    ]:
        state = transition(state, op, vm="web")
        assert state is expected


@pytest.mark.parametrize("state", list(St))
@pytest.mark.parametrize("op", list(Op))
def test_every_pair_either_leads_to_the_table_target_or_names_both_states(
    state: ReplicationState, op: ReplicationOp
) -> None:
    sources, target = TRANSITIONS[op]
    if state in sources:
        assert transition(state, op, vm="web") is target
        return
    with pytest.raises(StateError) as info:
        transition(state, op, vm="web")
    message = str(info.value)
    assert message.startswith(f"cannot {op.value} replication of VM 'web': it is {state.value} ")
    assert message.endswith(f"(needs: {', '.join(sorted(s.value for s in sources))})")


def test_a_refusal_reads_well() -> None:
    with pytest.raises(StateError) as info:
        transition(St.INITIAL_COPY, Op.FAILOVER, vm="web")
    assert str(info.value) == (
        "cannot failover replication of VM 'web': it is initial-copy "
        "(needs: error, paused, replicating, resynchronising)"
    )
    with pytest.raises(StateError, match="cannot resume replication of the VM: it is replicating"):
        transition(St.REPLICATING, Op.RESUME)


def test_every_operation_has_sources_and_a_target() -> None:
    assert set(TRANSITIONS) == set(Op)
    for sources, target in TRANSITIONS.values():
        assert sources
        assert isinstance(target, ReplicationState)


def test_removed_is_final_and_everything_else_can_be_removed() -> None:
    assert not any(St.REMOVED in sources for sources, _ in TRANSITIONS.values())
    for state in set(St) - {St.REMOVED}:
        assert transition(state, Op.REMOVE) is St.REMOVED


def test_a_failed_over_relationship_only_reverses_cancels_or_is_removed() -> None:
    leaving = {op for op, (sources, _) in TRANSITIONS.items() if St.FAILED_OVER in sources}
    assert leaving == {Op.REVERSE, Op.CANCEL_FAILOVER, Op.REMOVE}
    assert transition(St.FAILED_OVER, Op.CANCEL_FAILOVER) is St.REPLICATING


def test_hard_errors_stop_only_running_relationships() -> None:
    assert TRANSITIONS[Op.FAIL][0] == {St.INITIAL_COPY, St.REPLICATING, St.RESYNCHRONISING}
    with pytest.raises(StateError, match="it is paused"):
        transition(St.PAUSED, Op.FAIL)


def test_running_states_are_the_ones_the_scheduler_serves() -> None:
    assert {s for s in St if is_running(s)} == {
        St.INITIAL_COPY,
        St.REPLICATING,
        St.RESYNCHRONISING,
    }


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5s", 5), ("30s", 30), ("5m", 300), ("15m", 900), ("300s", 300), (" 5M ", 300), ("900", 900)],
)
def test_frequencies_parse(text: str, seconds: int) -> None:
    assert parse_frequency(text) == seconds


@pytest.mark.parametrize("text", ["1m", "1h", "0s", "", "-5m", "5min", "abc", "31s"])
def test_other_frequencies_are_refused(text: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        parse_frequency(text)
    assert str(info.value) == f"invalid replication frequency {text!r}: use 5s, 30s, 5m or 15m"


def test_frequency_in_seconds_and_back() -> None:
    assert DEFAULT_FREQUENCY == 300
    assert [format_frequency(s) for s in (5, 30, 300, 900)] == ["5s", "30s", "5m", "15m"]
    assert check_frequency(30) == 30
    with pytest.raises(InvalidInputError, match="invalid replication frequency 60s"):
        check_frequency(60)


def test_recovery_points_range() -> None:
    assert DEFAULT_RECOVERY_POINTS == 4
    assert [check_recovery_points(n) for n in (0, 4, 24)] == [0, 4, 24]
    for bad in (-1, MAX_RECOVERY_POINTS + 1):
        with pytest.raises(InvalidInputError) as info:
            check_recovery_points(bad)
        assert str(info.value) == (
            f"invalid number of recovery points {bad}: use 0..24 "
            "(the latest point is always kept on top of these)"
        )


# ------------------------------------------------------------------ retention


def chain(n: int) -> list[PointInfo]:
    return [PointInfo(id=i, time=1000.0 + i, file=f"p{i}.qcow2") for i in range(n)]


def apply(points: list[PointInfo], plan: list[Merge]) -> dict[int, dict[int, str]]:
    """Run a plan on a model of qcow2 files and return what each left point reads.

    Point i's overlay writes block i % 3 and block 10 + i; the base has all of
    blocks 0..2. Reads fall through to the backing file as qcow2 does.
    """
    own = {p.file: {p.id % 3: f"v{p.id}", 10 + p.id: f"v{p.id}"} for p in points}
    own[points[0].file] = {b: "base" for b in range(3)} | {10: "v0"}
    backing = {p.file: q.file for q, p in pairwise(points)}
    holds = {p.file: p.id for p in points}

    def read(file: str) -> dict[int, str]:
        below = read(backing[file]) if file in backing else {}
        return below | own[file]

    before = {p.id: read(p.file) for p in points}
    for m in plan:
        assert backing[m.overlay.file] == m.base_file
        assert holds[m.base_file] == m.drops.id
        own[m.base_file] |= own[m.overlay.file]  # qemu-img commit
        if m.rebase is not None:
            assert backing[m.rebase.file] == m.overlay.file
            backing[m.rebase.file] = m.base_file  # qemu-img rebase -u
        holds[m.base_file] = m.overlay.id
        del own[m.overlay.file], holds[m.overlay.file]
        backing.pop(m.overlay.file, None)
    after = {point: read(file) for file, point in holds.items()}
    for point, content in after.items():
        assert content == before[point], f"point {point} changed"
    return after


@pytest.mark.parametrize(("n", "keep"), [(0, 4), (1, 0), (3, 4), (5, 4), (1, 24), (25, 24)])
def test_no_merge_while_keep_plus_latest_or_fewer_points_exist(n: int, keep: int) -> None:
    assert retention_plan(chain(n), keep) == []


def test_one_point_too_many_merges_the_oldest_overlay_into_the_base() -> None:
    points = chain(6)
    assert retention_plan(points, 4) == [
        Merge(base_file="p0.qcow2", drops=points[0], overlay=points[1], rebase=points[2])
    ]
    assert sorted(apply(points, retention_plan(points, 4))) == [1, 2, 3, 4, 5]


def test_keep_zero_leaves_only_the_latest_in_the_base_file() -> None:
    points = chain(4)
    plan = retention_plan(points, 0)
    assert [(m.drops.id, m.overlay.id) for m in plan] == [(0, 1), (1, 2), (2, 3)]
    assert plan[-1].rebase is None
    assert {m.base_file for m in plan} == {"p0.qcow2"}
    latest = {0: "v3", 1: "v1", 2: "v2", 10: "v0", 11: "v1", 12: "v2", 13: "v3"}
    assert apply(points, plan) == {3: latest}


def test_at_most_twenty_four_points_plus_the_latest_remain() -> None:
    points = chain(40)
    plan = retention_plan(points, MAX_RECOVERY_POINTS)
    assert len(plan) == 15
    assert sorted(apply(points, plan)) == list(range(15, 40))
    with pytest.raises(InvalidInputError):
        retention_plan(points, MAX_RECOVERY_POINTS + 1)


def test_a_point_under_a_test_failover_holds_back_retention() -> None:
    points = chain(8)
    assert len(retention_plan(points, 2)) == 5
    # drops, overlay or rebase of a merge in use: it and every later merge wait
    assert retention_plan(points, 2, in_use={0}) == []
    assert len(retention_plan(points, 2, in_use={3})) == 1
    assert len(retention_plan(points, 2, in_use={4})) == 2
    # points that stay anyway do not matter
    assert len(retention_plan(points, 2, in_use={7})) == 5


def test_points_out_of_order_are_refused() -> None:
    points = chain(3)
    with pytest.raises(InvalidInputError, match="oldest first"):
        retention_plan([points[1], points[0], points[2]], 0)
    with pytest.raises(InvalidInputError, match="oldest first"):
        retention_plan([points[0], points[0]], 0)


# ------------------------------------------------------------------ versions


def test_a_replica_on_the_same_or_a_newer_level_accepts() -> None:
    check_replica_accepts(2, 2, primary="a", replica="b", vm="web")
    check_replica_accepts(2, 3, primary="a", replica="b", vm="web")


def test_an_older_replica_is_refused_naming_both_levels_and_hosts() -> None:
    with pytest.raises(VersionError) as info:
        check_replica_accepts(3, 2, primary="host-1", replica="host-2", vm="web")
    assert str(info.value) == (
        "replica host 'host-2' runs functional level 2, older than primary host 'host-1' "
        "at level 3: it cannot receive replication of VM 'web'; upgrade 'host-2' first "
        "(replica side before primary)"
    )


def test_reversing_to_an_older_old_primary_is_refused_until_it_is_upgraded() -> None:
    check_reverse_allowed(3, 3, running_host="host-2", old_primary="host-1", vm="web")
    check_reverse_allowed(2, 3, running_host="host-2", old_primary="host-1", vm="web")
    with pytest.raises(VersionError) as info:
        check_reverse_allowed(3, 2, running_host="host-2", old_primary="host-1", vm="web")
    assert str(info.value) == (
        "cannot reverse replication of VM 'web': old primary host 'host-1' runs functional "
        "level 2, older than host 'host-2' at level 3 where the VM now runs; "
        "upgrade 'host-1' first"
    )


# ------------------------------------------------------------------ cycles and health

NOW = 100_000.0


def ok(started: float, size: int = 1000, duration: float = 2.0) -> CycleRecord:
    return CycleRecord(started=started, ok=True, kind="success", bytes=size, duration_s=duration)


def bad(started: float, kind: str = "failure") -> CycleRecord:
    return CycleRecord(started=started, ok=False, kind=kind, bytes=0, duration_s=1.0)


def every(frequency: int, n_bad: int, kind: str = "miss") -> list[CycleRecord]:
    """One record per expected cycle of the last hour, the first ``n_bad`` bad."""
    starts = [NOW - i * frequency for i in range(3600 // frequency)]
    return [bad(t, kind) if i < n_bad else ok(t) for i, t in enumerate(starts)]


def test_cycle_records_check_their_kind() -> None:
    with pytest.raises(InvalidInputError, match="unknown cycle kind 'late'"):
        CycleRecord(started=0, ok=False, kind="late", bytes=0, duration_s=0)
    with pytest.raises(InvalidInputError, match="a miss cycle cannot have ok=True"):
        CycleRecord(started=0, ok=True, kind="miss", bytes=0, duration_s=0)
    with pytest.raises(InvalidInputError, match="a success cycle cannot have ok=False"):
        CycleRecord(started=0, ok=False, kind="success", bytes=0, duration_s=0)


def check(
    state: ReplicationState,
    cycles: list[CycleRecord],
    frequency: int,
    *,
    last_success: float | None = NOW - 10,
    window_s: float = 3600,
    since: float | None = None,
) -> Health:
    return health(
        state,
        cycles,
        now=NOW,
        frequency_s=frequency,
        window_s=window_s,
        last_success=last_success,
        since=since,
    )


@pytest.mark.parametrize(
    ("frequency", "n_bad", "expected"),
    [
        (30, 0, Health.NORMAL),
        (30, 24, Health.NORMAL),  # exactly 20% of 120
        (30, 25, Health.WARNING),
        (300, 2, Health.NORMAL),  # 16.7% of 12
        (300, 3, Health.WARNING),  # 25%
        (900, 1, Health.WARNING),  # 25% of 4
    ],
)
def test_over_a_fifth_of_the_expected_cycles_missed_or_failed_warns(
    frequency: int, n_bad: int, expected: Health
) -> None:
    assert check(St.REPLICATING, every(frequency, n_bad), frequency) is expected


@pytest.mark.parametrize("kind", ["miss", "failure", "network-failure"])
def test_exactly_a_fifth_is_normal_for_every_failure_kind(kind: str) -> None:
    # a 25-minute window at 5 minutes expects 5 cycles
    cycles = [ok(NOW - 300 * i) for i in range(4)] + [bad(NOW - 1200, kind)]
    assert check(St.REPLICATING, cycles, 300, window_s=1500) is Health.NORMAL
    cycles.append(bad(NOW - 1201, kind))
    assert check(St.REPLICATING, cycles, 300, window_s=1500) is Health.WARNING


def test_only_cycles_inside_the_window_count() -> None:
    old = [bad(NOW - 3600 - i) for i in range(50)]  # at or before the window's open end
    future = [bad(NOW + 1 + i) for i in range(50)]
    assert check(St.REPLICATING, old + future, 300) is Health.NORMAL
    assert check(St.REPLICATING, [*old, bad(NOW - 3599), bad(NOW), bad(NOW)], 300) is (
        Health.WARNING
    )


def test_a_young_relationship_is_judged_on_its_own_life() -> None:
    cycles = [ok(NOW - 300), bad(NOW)]
    assert check(St.REPLICATING, cycles, 300) is Health.NORMAL  # 1 of 12
    assert check(St.REPLICATING, cycles, 300, since=NOW - 600) is Health.WARNING  # 1 of 2


@pytest.mark.parametrize(
    ("age", "expected"),
    [
        (3600, Health.NORMAL),
        (3601, Health.WARNING),
        (4 * 3600, Health.WARNING),
        (4 * 3600 + 1, Health.CRITICAL),
    ],
)
def test_nothing_replicated_for_an_hour_warns_and_for_four_hours_is_critical(
    age: float, expected: Health
) -> None:
    assert check(St.REPLICATING, [], 300, last_success=NOW - age) is expected
    assert check(St.RESYNCHRONISING, [], 300, last_success=NOW - age) is expected


def test_stopped_relationships() -> None:
    good = every(300, 0)
    assert check(St.ERROR, good, 300) is Health.CRITICAL
    assert check(St.PAUSED, good, 300) is Health.WARNING
    assert check(St.PAUSED, [], 300, last_success=NOW - 4 * 3600 - 1) is Health.CRITICAL
    assert check(St.REMOVED, good, 300) is Health.CRITICAL
    # A failed-over relationship replicates nothing by design: no stale rule.
    assert check(St.FAILED_OVER, [], 300, last_success=NOW - 86400) is Health.WARNING


def test_without_any_success_staleness_counts_from_the_start_except_for_the_initial_copy() -> None:
    long_ago = NOW - 5 * 3600
    assert check(St.INITIAL_COPY, [], 300, last_success=None, since=long_ago) is Health.NORMAL
    assert check(St.REPLICATING, [], 300, last_success=None, since=long_ago) is Health.CRITICAL
    assert check(St.REPLICATING, [], 300, last_success=None, since=NOW - 60) is Health.NORMAL
    assert check(St.REPLICATING, [], 300, last_success=None) is Health.NORMAL


def test_health_reasons_say_why() -> None:
    report = assess_health(
        St.PAUSED, every(300, 3), now=NOW, frequency_s=300, last_success=NOW - 7200
    )
    assert report.health is Health.WARNING
    assert report.reasons == (
        "replication is paused",
        "3 of 12 expected cycles were missed or failed",
        "nothing replicated for 120 min",
    )


def test_statistics_follow_the_cli_fields() -> None:
    cycles = [
        ok(NOW - 900, size=100, duration=1.0),
        bad(NOW - 600, "miss"),
        bad(NOW - 500, "network-failure"),
        bad(NOW - 450, "failure"),
        ok(NOW - 300, size=300, duration=5.0),
        ok(NOW - 30, size=200, duration=3.0),
    ]
    stats = statistics(cycles, NOW)
    assert stats == {
        "success_count": 3,
        "miss_count": 1,
        "failure_count": 2,
        "network_failure_count": 1,
        "replicated_bytes": 600,
        "average_delta_bytes": 200,
        "max_delta_bytes": 300,
        "average_cycle_s": 3.0,
        "max_cycle_s": 5.0,
        "last_replication_time": NOW - 27,
        "lag_s": 30.0,
    }
    assert latest_point_time(cycles) == NOW - 30
    status_fields = {"last_replication_time", "lag_s", "success_count", "miss_count"}
    assert status_fields | {"failure_count"} <= set(stats)


def test_statistics_of_no_success() -> None:
    stats = statistics([bad(NOW - 10)], NOW)
    assert stats["failure_count"] == 1
    assert stats["success_count"] == stats["replicated_bytes"] == 0
    assert stats["lag_s"] is stats["last_replication_time"] is stats["average_delta_bytes"] is None
    assert latest_point_time([]) is None


def test_lag_is_never_negative() -> None:
    assert statistics([ok(NOW + 5)], NOW)["lag_s"] == 0.0


# ------------------------------------------------------------------ scheduling


def test_a_first_cycle_is_due_at_once_then_one_period_after_each_start() -> None:
    assert next_due(None, 300, NOW) == NOW
    assert missed_slots(None, 300, NOW) == 0
    assert next_due(1000, 300, 1100) == 1300
    assert next_due(1000, 300, 1300) == 1300


def test_a_late_start_within_one_period_is_not_a_miss() -> None:
    assert next_due(1000, 300, 1599) == 1300
    assert not is_missed(1300, 300, 1599)
    assert missed_slots(1000, 300, 1599) == 0


def test_a_start_a_whole_period_late_is_a_miss() -> None:
    assert is_missed(1300, 300, 1600)
    assert missed_slots(1000, 300, 1600) == 1
    assert next_due(1000, 300, 1600) == 1600


def test_a_long_outage_counts_every_missed_slot_and_does_not_queue_a_burst() -> None:
    now = 1000 + 300 * 10 + 5
    assert missed_slots(1000, 300, now) == 9
    assert next_due(1000, 300, now) == 4000


def test_the_next_due_time_can_always_still_start() -> None:
    rng = random.Random(4)
    for _ in range(2000):
        frequency = rng.choice([30, 300, 900])
        last = rng.uniform(0, 10_000)
        now = last + rng.uniform(0, 50 * frequency)
        due = next_due(last, frequency, now)
        assert not is_missed(due, frequency, now)
        assert now - frequency < due <= max(now, last + frequency)


def test_a_slow_vm_does_not_move_another_vms_schedule() -> None:
    # web's cycle overran by three periods; db's schedule depends only on db.
    now = 2000.0
    assert missed_slots(now - 4 * 30 - 1, 30, now) == 3
    assert next_due(now - 20, 30, now) == now + 10
