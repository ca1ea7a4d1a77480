"""A move's pause from timestamps: the clock offset, the downtime, the phases, post-copy's start."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ferry.adapters.migration import OutgoingMigration
from ferry.adapters.migration.convergence import Convergence
from ferry.core.pause import (
    ClockOffset,
    ClockSample,
    estimate_offset,
    event_time,
    pause_ms,
    phase_breakdown,
)
from ferry.testing.qmp import FakeQmp


def test_offset_is_the_remote_clock_minus_the_midpoint_of_the_shortest_round_trip() -> None:
    samples = [
        ClockSample(sent=100.0, remote=105.30, received=100.4),  # 400 ms: offset 5.1
        ClockSample(sent=101.0, remote=106.01, received=101.02),  # 20 ms: offset 5.0
        ClockSample(sent=102.0, remote=107.5, received=102.9),
    ]
    offset = estimate_offset(samples)
    assert offset.offset == pytest.approx(5.0)
    assert offset.error == pytest.approx(0.01)
    assert offset.to_local(110.0) == pytest.approx(105.0)


def test_offset_needs_a_sample_with_a_sane_round_trip() -> None:
    with pytest.raises(ValueError):
        estimate_offset([ClockSample(sent=2.0, remote=1.0, received=1.0)])


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ({"event": "STOP", "timestamp": {"seconds": 1700000000, "microseconds": 250000}},
         1700000000.25),
        ({"event": "STOP"}, None),
        ({"event": "STOP", "timestamp": {"seconds": -1, "microseconds": -1}}, None),
        ({"event": "STOP", "timestamp": "soon"}, None),
    ],
)  # fmt: skip
def test_event_time_reads_qemus_timestamp(event: dict[str, Any], expected: float | None) -> None:
    assert event_time(event) == expected


def test_pause_runs_from_stop_to_resume_on_the_source_clock() -> None:
    # The destination's clock is 2 s ahead: its RESUME at 1002.080 is 1000.080 here.
    assert pause_ms(1000.0, 1002.080, ClockOffset(2.0, 0.001)) == 80


@pytest.mark.parametrize("resumed", [1000.0, 999.99, 1000.0002])
def test_pause_is_never_reported_as_zero(resumed: float) -> None:
    assert pause_ms(1000.0, resumed, ClockOffset(0.0, 0.0)) >= 1


def test_phases_line_up_both_clocks_and_skip_marks_not_noted() -> None:
    marks = {"stopped": 10.000, "continued": 10.030, "completed": 10.050,
             "loaded": 12.060, "resumed": 12.065}  # fmt: skip
    assert phase_breakdown(marks, ClockOffset(2.0, 0.0)) == {
        "stopped->continued": 30, "continued->completed": 20, "completed->loaded": 10,
        "loaded->resumed": 5}  # fmt: skip


def test_auto_converge_is_on_by_default_and_postcopy_only_when_asked() -> None:
    assert Convergence().capabilities() == [{"capability": "auto-converge", "state": True}]
    assert {"capability": "postcopy-ram", "state": True} in Convergence(
        postcopy=True).capabilities()  # fmt: skip


def _migrating(syncs: list[int]) -> FakeQmp:
    qmp = FakeQmp("source")
    qmp.reply("query-migrate", *({"status": "active", "ram": {"dirty-sync-count": n}}
                                 for n in syncs))  # fmt: skip
    return qmp


def test_postcopy_starts_once_every_page_went_once() -> None:
    qmp = _migrating([1, 1, 2])
    started = asyncio.run(OutgoingMigration(qmp, tag="j", target="h").start_postcopy(
        lambda _: None))  # fmt: skip
    assert started
    assert qmp.actions() == ["migrate-start-postcopy"]
    assert qmp.commands().count("query-migrate") == 3


def test_postcopy_is_not_started_when_the_stream_converged_first() -> None:
    qmp = FakeQmp("source")
    qmp.reply("query-migrate", {"status": "active"}, {"status": "pre-switchover"})
    started = asyncio.run(OutgoingMigration(qmp, tag="j", target="h").start_postcopy(
        lambda _: None))  # fmt: skip
    assert not started
    assert "migrate-start-postcopy" not in qmp.actions()
