"""The estimate model: pre-copy passes, convergence, disk copies, the other options."""

from __future__ import annotations

import pytest

from ferry.core.plan.estimate import (
    Calibration,
    Workload,
    copy_cluster_roles,
    export_import,
    in_place,
    live_migration,
    move_replica,
)

M = 1024**2
CAL = Calibration(setup_s=1.0, memory_fixed_s=0.0, disk_fixed_s=0.0, switch_s=0.05,
                  downtime_limit_s=0.3, migration_cap_bps=1e12,
                  stream_factor=1.0, zero_page_bps=1e15, used_fraction=1.0, disk_factor=1.0,
                  local_disk_bps=100 * M, stop_s=2.0, start_s=1.0)  # fmt: skip


def work(**kw: float | bool) -> Workload:
    base: dict[str, float | bool] = dict(memory=1024 * M, dirty_rate_bps=0.0, disk_bytes=0,
                                         copy_disks=False, bandwidth_bps=100 * M)  # fmt: skip
    base.update(kw)
    return Workload(**base)  # type: ignore[arg-type]


def test_idle_vm_is_one_pass() -> None:
    e = live_migration(work(), CAL)
    assert e.converges and e.passes == 1
    assert e.memory_s == pytest.approx(10.24, abs=2e-3)
    assert e.downtime_s == pytest.approx(0.05, abs=2e-3)
    assert e.total_s == pytest.approx(1.0 + 10.24 + 0.05, abs=2e-3)


def test_passes_shrink_by_the_dirty_ratio() -> None:
    # 10 MiB/s over 100 MiB/s: each pass is a tenth of the one before.
    e = live_migration(work(dirty_rate_bps=10 * M), CAL)
    assert e.converges and e.passes == 2
    assert e.memory_s == pytest.approx(10.24 + 1.024, abs=2e-3)
    # what is left after the second pass (1.024 s * 10 MiB/s) goes in the pause
    assert e.downtime_s == pytest.approx(0.1024 + 0.05, abs=2e-3)


def test_more_dirty_means_more_time_and_downtime() -> None:
    low = live_migration(work(dirty_rate_bps=5 * M), CAL)
    high = live_migration(work(dirty_rate_bps=40 * M), CAL)
    assert high.total_s > low.total_s
    assert high.passes > low.passes


def test_dirtier_than_the_link_does_not_converge() -> None:
    e = live_migration(work(dirty_rate_bps=150 * M), CAL)
    assert not e.converges


def test_a_looser_downtime_limit_converges_sooner() -> None:
    tight = live_migration(work(dirty_rate_bps=60 * M), CAL)
    loose = live_migration(work(dirty_rate_bps=60 * M, downtime_limit_s=5.0), CAL)
    assert loose.passes < tight.passes
    assert loose.downtime_s <= 5.0 + CAL.switch_s


def test_copied_disks_add_their_allocation_over_the_link() -> None:
    shared = live_migration(work(disk_bytes=500 * M), CAL)
    copied = live_migration(work(disk_bytes=500 * M, copy_disks=True), CAL)
    assert copied.disk_s == pytest.approx(5.0, abs=2e-3)
    assert copied.total_s == pytest.approx(shared.total_s + 5.0, abs=2e-3)
    assert copied.downtime_s == shared.downtime_s


def test_bandwidth_cap_bounds_the_stream() -> None:
    capped = Calibration(**{**CAL.__dict__, "migration_cap_bps": 50.0 * M})
    assert live_migration(work(), capped).memory_s == pytest.approx(20.48, abs=2e-3)


def test_export_import_is_downtime_for_a_running_vm_and_none_for_an_off_one() -> None:
    on = export_import(work(disk_bytes=100 * M), CAL)
    assert on.downtime_s == on.total_s == pytest.approx(2.0 + 2 * 1.0 + 1.0 + 1.0, abs=2e-3)
    off = export_import(work(disk_bytes=100 * M, running=False), CAL)
    assert off.downtime_s == 0 and off.total_s == pytest.approx(3.0, abs=2e-3)


def test_the_other_options() -> None:
    assert copy_cluster_roles(work(), CAL).downtime_s == pytest.approx(3.0, abs=2e-3)
    assert move_replica(work(disk_bytes=200 * M), CAL).downtime_s == 0
    assert move_replica(work(disk_bytes=200 * M), CAL).total_s == pytest.approx(3.0, abs=2e-3)
    assert in_place(work(), CAL).downtime_s < 1
    assert in_place(work(running=False), CAL).total_s == 0
