"""ferry doctor's verdicts: thresholds, remedies, the clock comparison."""

from __future__ import annotations

import datetime as dt

from ferry.core import doctor
from ferry.core.doctor import Check, ClockSample, GiB, Status

NOW = dt.datetime(2026, 12, 2, tzinfo=dt.UTC)


def test_qemu_version_and_machine_type() -> None:
    ok = doctor.qemu_version_check("7.2.22 (Debian 1:7.2+dfsg-7)", machine_type="pc-q35-7.2",
                                   machine_types=["pc-q35-7.2", "pc-q35-7.1"])  # fmt: skip
    assert ok.status is Status.OK and "7.2.22" in ok.detail
    old = doctor.qemu_version_check("6.2.0", machine_type="pc-q35-7.2", machine_types=None)
    assert old.status is Status.FAIL and "older" in old.detail and "apt-get" in old.remedy
    no_machine = doctor.qemu_version_check("8.0.0", machine_type="pc-q35-7.2",
                                           machine_types=["pc-q35-8.0"])  # fmt: skip
    assert no_machine.status is Status.FAIL and "functional_level" in no_machine.remedy
    garbage = doctor.qemu_version_check("", machine_type="pc-q35-7.2", machine_types=None)
    assert garbage.status is Status.FAIL
    assert doctor.parse_qemu_version("10.1") == (10, 1, 0)


def test_qemu_features_name_what_is_missing_and_what_needs_it() -> None:
    commands = set(doctor.QMP_COMMANDS)
    caps = set(doctor.MIGRATE_CAPABILITIES)
    assert doctor.qemu_features_check(commands, caps).status is Status.OK
    lacking = doctor.qemu_features_check(commands - {"blockdev-mirror"},
                                         caps - {"pause-before-switchover"})  # fmt: skip
    assert lacking.status is Status.FAIL
    assert "blockdev-mirror (moves without shared storage)" in lacking.detail
    assert "capability pause-before-switchover" in lacking.detail
    unknown = doctor.qemu_features_check(None, None, error="QEMU exited")
    assert unknown.status is Status.FAIL and "QEMU exited" in unknown.detail


def test_kvm() -> None:
    assert doctor.kvm_check(configured="auto", accelerator="kvm", dev_kvm=True,
                            probe="kvm").status is Status.OK  # fmt: skip
    assert doctor.kvm_check(configured="tcg", accelerator="tcg", dev_kvm=False,
                            probe=None).status is Status.OK  # fmt: skip
    missing = doctor.kvm_check(configured="auto", accelerator="tcg", dev_kvm=False, probe=None)
    assert missing.status is Status.WARN and "/dev/kvm" in missing.detail
    nested = doctor.kvm_check(configured="auto", accelerator="tcg", dev_kvm=True, probe="tcg")
    assert nested.status is Status.WARN and "accelerator.json" in nested.remedy


def test_certificate_expiry_bounds() -> None:
    def status(days: float) -> Status:
        return doctor.cert_check("cert_host", "host certificate", NOW + dt.timedelta(days=days),
                                 NOW, remedy="renew").status  # fmt: skip

    assert status(365) is Status.OK
    assert status(30.1) is Status.OK
    assert status(29.9) is Status.WARN
    assert status(0.01) is Status.WARN
    assert status(0) is Status.FAIL
    assert status(-3) is Status.FAIL
    unreadable = doctor.cert_check("cert_ca", "CA certificate", None, NOW, remedy="renew",
                                   error="no such file")  # fmt: skip
    assert unreadable.status is Status.FAIL and "no such file" in unreadable.detail
    assert unreadable.remedy == "renew"


def test_space_needs_both_bounds_crossed() -> None:
    def status(free: int, total: int) -> Status:
        return doctor.space_check("space:data_dir", "data dir", "/d", free, total).status

    assert status(50 * GiB, 100 * GiB) is Status.OK
    assert status(8 * GiB, 100 * GiB) is Status.OK  # under 10 % but over 5 GiB
    assert status(4 * GiB, 100 * GiB) is Status.WARN
    assert status(4 * GiB, 30 * GiB) is Status.OK  # 13 %
    assert status(int(0.5 * GiB), 100 * GiB) is Status.FAIL
    assert status(int(0.5 * GiB), 10 * GiB) is Status.WARN  # 5 % of a small disk
    assert status(100 * GiB, 20 * 1024 * GiB) is Status.OK  # 0.5 % of 20 TiB: plenty
    gone = doctor.space_check("space:replica_storage", "replica storage", "/r", None, None,
                              error="No such file or directory")  # fmt: skip
    assert gone.status is Status.FAIL and "/r" in gone.remedy


def test_bridge_and_etcd() -> None:
    assert doctor.bridge_check("prod", "br0", None, True).status is Status.OK
    missing = doctor.bridge_check("prod", "br0", "ns1", False)
    assert missing.status is Status.FAIL and missing.name == "network:prod"
    assert (
        "in namespace ns1" in missing.detail and "ferry host network remove prod" in missing.remedy
    )
    assert doctor.etcd_check("c1", error=None, latency_s=0.01).status is Status.OK
    assert doctor.etcd_check("c1", error=None, latency_s=2).status is Status.WARN
    down = doctor.etcd_check("c1", error="connection refused", latency_s=5)
    assert down.status is Status.FAIL and "fence" in down.detail


def _sample(offset: float, rtt: float = 0.01, work: float = 0.0) -> ClockSample:
    """A round trip of ``rtt`` s on the network around ``work`` s in the agent."""
    received = 1000.0 + rtt / 2 + offset
    return ClockSample(before=1000.0, received=received, sent=received + work,
                       after=1000.0 + rtt + work)  # fmt: skip


def test_clock_skew_against_the_other_hosts() -> None:
    checks = {c.host: c for c in doctor.clock_checks(
        {"a": _sample(0.0), "b": _sample(0.2), "c": _sample(3.0), "d": _sample(-7.0)})}  # fmt: skip
    # The median of the four offsets is 0.1 s.
    assert checks["a"].status is Status.OK
    assert checks["b"].status is Status.OK
    assert checks["c"].status is Status.WARN and "ahead of the other hosts" in checks["c"].detail
    assert checks["d"].status is Status.FAIL and "behind" in checks["d"].detail
    assert "NTP" in checks["d"].remedy and "lease" in checks["d"].remedy


def test_clock_round_trip_is_not_skew() -> None:
    # Two seconds apart, but the answer took three seconds: it may be no skew at all.
    slow = doctor.clock_checks({"a": _sample(0.0), "b": _sample(2.0, rtt=6.0), "c": _sample(0.0)})
    assert all(c.status is Status.OK for c in slow)
    # An agent that worked 8 s on its answer (a slow QEMU probe) is not 4 s off.
    busy = doctor.clock_checks({"a": _sample(0.0), "b": _sample(0.0, work=8.0)})
    assert all(c.status is Status.OK for c in busy), busy
    assert doctor.clock_checks({"a": _sample(0.0), "b": _sample(6.0, work=8.0)})[0].status is (
        Status.WARN  # 6 s apart: each is 3 s from their median
    )
    one = doctor.clock_checks({"a": _sample(1.5)})
    assert one[0].status is Status.WARN and "this client" in one[0].detail
    assert doctor.clock_checks({}) == []


def test_check_json_round_trip_and_failed() -> None:
    check = Check("qemu", Status.WARN, "detail", "remedy", "host-1")
    raw = check.to_json()
    assert raw == {"name": "qemu", "status": "warn", "detail": "detail", "remedy": "remedy",
                   "host": "host-1"}  # fmt: skip
    assert Check.from_json(raw) == check
    assert not doctor.failed([check])
    assert doctor.failed([check, Check("kvm", Status.FAIL, "x")])
    assert doctor.unreachable_check("h", "refused").status is Status.FAIL
