"""Calibrating the estimate from a host's recent moves: the samples a job list
gives, the medians each fixed part takes, the default with too few, and the
planner using a source host's recent moves."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ferry.core.plan.calibrate import WINDOW, calibrate, note, sample_of, samples_of, used
from ferry.core.plan.estimate import DEFAULT, Calibration
from ferry.core.plan.plan_file import (
    DiskFacts,
    HostFacts,
    Inventory,
    LinkFacts,
    MoveSample,
    StorageKind,
    VmFacts,
    digest_of,
    dumps,
    loads,
)
from ferry.core.plan.planner import Targets, make_plan

M = 1024**2
G = 1024**3
NOW = "2026-12-02T03:30:00Z"


def job(**kw: Any) -> dict[str, Any]:
    """A finished move's job view as ``GET /v1/jobs`` lists it (the 256M idle bench move)."""
    view: dict[str, Any] = {
        "id": "j1", "kind": "move", "vm": "a", "vm_uuid": "u-a", "host": "host-1",
        "state": "done", "created": 100.0, "updated": 104.0, "storage": "copy",
        "progress": {"disk_bytes": 32 * M, "disk_total": 32 * M, "ram_bytes": 64 * M,
                     "ram_total": 256 * M, "status": "completed"},
        "result": {"result": "ok", "host": "host-2", "total_s": 3.15, "downtime_ms": 40,
                   "resume_ms": 5, "storage": "copy", "disk_copy_s": 0.279,
                   "memory_copy_s": 1.37},
    }  # fmt: skip
    view.update(kw)
    return view


def sample(finished: float = 0.0, **kw: Any) -> MoveSample:
    fields: dict[str, Any] = dict(finished=finished, total_s=3.0, downtime_ms=50,
                                  storage="copy", disk_copy_s=0.3, disk_bytes=0,
                                  memory_copy_s=1.05, memory_bytes=0, memory_sent=0)  # fmt: skip
    fields.update(kw)
    return MoveSample(**fields)


@pytest.mark.parametrize(
    ("view", "expected"),
    [
        (job(), MoveSample(finished=104.0, total_s=3.15, downtime_ms=40, storage="copy",
                           disk_copy_s=0.279, disk_bytes=32 * M, memory_copy_s=1.37,
                           memory_bytes=256 * M, memory_sent=64 * M)),
        (job(kind="export"), None),
        (job(state="failed", result=None), None),
        (job(state="cancelled"), None),
        (job(result=None), None),
        (job(result={"result": "ok", "total_s": 0}), None),
        (job(result={"result": "ok", "total_s": "3"}), None),
        (job(progress=None, result={"total_s": 2.0, "downtime_ms": 30, "storage": "shared",
                                    "memory_copy_s": 1.0}),
         MoveSample(finished=104.0, total_s=2.0, downtime_ms=30, storage="shared",
                    memory_copy_s=1.0)),
    ],
)  # fmt: skip
def test_sample_of_a_job_view(view: dict[str, Any], expected: MoveSample | None) -> None:
    assert sample_of(view) == expected


def test_samples_of_keeps_the_newest_window_oldest_first() -> None:
    views = [job(id=f"j{i}", updated=float(100 - i)) for i in range(WINDOW + 3)]
    views.append(job(kind="export", updated=500.0))
    found = samples_of(views)
    assert len(found) == WINDOW
    assert [s.finished for s in found] == sorted(float(100 - i) for i in range(WINDOW))


@pytest.mark.parametrize(
    ("samples", "fields"),
    [
        # No samples: the default, unchanged.
        ([], {}),
        # One idle copied move, no byte counts: the fixed parts are its times.
        ([sample()], {"setup_s": 1.65, "disk_fixed_s": 0.3, "memory_fixed_s": 1.0,
                      "switch_s": 0.05}),
        # The median of three, whatever their order; a shared move has no disk part.
        ([sample(3, total_s=4.0), sample(1, total_s=2.0, disk_copy_s=0.0, storage="shared"),
          sample(2, total_s=9.0, disk_copy_s=0.5, downtime_ms=200)],
         {"setup_s": 2.65, "disk_fixed_s": 0.4, "memory_fixed_s": 1.0, "switch_s": 0.05}),
        # Bytes crossed are taken off at the model's rates; the used fraction is measured.
        ([sample(disk_bytes=int(0.9 * G), disk_copy_s=1.3, memory_bytes=512 * M,
                 memory_sent=int(0.45 * G), memory_copy_s=2.05, downtime_ms=50)],
         {"setup_s": 0.0, "disk_fixed_s": 0.3, "memory_fixed_s": 1.4,
          "switch_s": 0.05, "used_fraction": 0.9}),
        # Times that do not add up never give a negative constant.
        ([sample(total_s=1.0, disk_copy_s=2.0, memory_copy_s=0.01)],
         {"setup_s": 0.0, "memory_fixed_s": 0.0}),
    ],
)  # fmt: skip
def test_calibrate(samples: list[MoveSample], fields: dict[str, float]) -> None:
    cal = calibrate(samples)
    for name, value in fields.items():
        assert getattr(cal, name) == pytest.approx(value, abs=0.002), name
    untouched = {"downtime_limit_s", "migration_cap_bps", "stream_factor", "zero_page_bps",
                 "local_disk_bps", "stop_s", "start_s", "disk_factor"}  # fmt: skip
    for name in untouched:
        assert getattr(cal, name) == getattr(DEFAULT, name)
    if not samples:
        assert cal is DEFAULT


def test_calibrate_counts_only_the_newest_window() -> None:
    old = [sample(i, total_s=100.0) for i in range(20)]
    new = [sample(100 + i, total_s=3.0) for i in range(WINDOW)]
    assert calibrate(old + new).setup_s == pytest.approx(1.65)
    assert used(old + new) == WINDOW and used([]) == 0


def test_calibrate_keeps_a_given_default() -> None:
    mine = Calibration(setup_s=9.0)
    assert calibrate([], mine) is mine
    assert calibrate([sample()], mine).stop_s == mine.stop_s


def test_note_says_where_the_estimates_come_from() -> None:
    assert note([], "host-1") == "estimates from host-1: default constants (no recent moves)"
    assert note([sample(), sample(1)], "host-1") == \
        "estimates calibrated from 2 recent move(s) on host-1"  # fmt: skip


def _inventory(moves: list[MoveSample]) -> Inventory:
    hosts = [HostFacts(name=h, url=f"https://127.0.0.1/{h}", functional_level=2,
                       memory=16 * G, free_memory=8 * G,
                       recent_moves=moves if h == "host-1" else [])
             for h in ("host-1", "host-2")]  # fmt: skip
    vm = VmFacts(name="a", uuid="u-a", host="host-1", state="running", memory=256 * M,
                 config_version=1, dirty_rate_bps=0.0, storage=StorageKind.LOCAL,
                 disks=[DiskFacts(path="/d/a", size=32 * M, allocation=2 * M)])  # fmt: skip
    links = [LinkFacts(src="host-1", dst="host-2", bandwidth_bps=2.0 * G)]
    return Inventory(taken=NOW, hosts=hosts, vms=[vm], links=links)


def test_planner_estimates_from_the_source_hosts_recent_moves() -> None:
    targets = Targets(["host-1"], ["host-2"])
    default = make_plan(_inventory([]), targets, created=NOW).steps[0]
    measured = [MoveSample(finished=float(i), total_s=3.15, downtime_ms=40, storage="copy",
                           disk_copy_s=0.279, disk_bytes=2 * M, memory_copy_s=1.37,
                           memory_bytes=256 * M, memory_sent=64 * M)
                for i in range(3)]  # fmt: skip
    plan = make_plan(_inventory(measured), targets, created=NOW)
    step = plan.steps[0]
    assert default.estimate_s > 5.0  # the fixed constants: set-up, mirrors, stream start
    assert step.estimate_s == pytest.approx(3.15, rel=0.1)
    assert step.downtime_s == pytest.approx(0.04, abs=0.01)
    # The plan file carries the samples, and a plan without them still loads.
    again = loads(dumps(plan))
    assert again.inventory.host("host-1").recent_moves == measured  # type: ignore[union-attr]
    doc = json.loads(dumps(make_plan(_inventory([]), targets, created=NOW)))
    for facts in doc["inventory"]["hosts"]:
        del facts["recent_moves"]  # a plan written before calibration
    doc["digest"] = digest_of(doc)
    assert loads(json.dumps(doc)).inventory.host("host-1").recent_moves == []  # type: ignore[union-attr]
