"""``ferry doctor``'s verdicts: facts about a host in, ``ok``/``warn``/``fail`` and a remedy out.

Pure: the agent (:mod:`ferry.host.doctor`) and the client gather the facts
(QEMU's answers, certificate dates, free bytes, clocks); the thresholds and
the words an admin reads live here, so they are tested without a host.
"""

from __future__ import annotations

import datetime as dt
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    """One line of ``ferry doctor``: ``remedy`` is empty when nothing is to be done."""

    name: str
    status: Status
    detail: str
    remedy: str = ""
    host: str = ""

    def to_json(self) -> dict[str, str]:
        return {**asdict(self), "status": self.status.value}

    @classmethod
    def from_json(cls, raw: Mapping[str, object]) -> Check:
        return cls(name=str(raw["name"]), status=Status(str(raw["status"])),
                   detail=str(raw.get("detail", "")), remedy=str(raw.get("remedy", "")),
                   host=str(raw.get("host", "")))  # fmt: skip


def failed(checks: Iterable[Check]) -> bool:
    return any(c.status is Status.FAIL for c in checks)


# -- QEMU ------------------------------------------------------------------------------

MIN_QEMU = (7, 2)
INSTALL_QEMU = "install QEMU 7.2 or newer (apt-get install -y qemu-system-x86 qemu-utils)"

# The QMP commands ferry sends, by what needs them (adapters/qemu.py, adapters/migration/,
# adapters/backup.py, adapters/cbt.py ...): a QEMU without one fails that operation only.
QMP_COMMANDS: dict[str, str] = {
    "blockdev-add": "disks",
    "blockdev-del": "disks",
    "blockdev-mirror": "moves without shared storage",
    "block-export-add": "moves without shared storage (NBD export)",
    "nbd-server-start": "moves without shared storage (NBD server)",
    "nbd-server-stop": "moves without shared storage (NBD server)",
    "block-dirty-bitmap-add": "replication (changed block tracking)",
    "block-dirty-bitmap-remove": "replication (changed block tracking)",
    "blockdev-backup": "replication (point-in-time copies)",
    "transaction": "replication (consistent multi-disk points)",
    "migrate": "moves",
    "migrate-incoming": "moves",
    "migrate-set-capabilities": "moves",
    "migrate-set-parameters": "moves",
    "migrate-continue": "moves (switch-over after pause-before-switchover)",
    "announce-self": "moves (the network learns the VM's new port)",
    "calc-dirty-rate": "the planner's dirty-rate estimate",
    "query-cpu-definitions": "CPU model checks",
}
# The migration capabilities ferry switches on.
MIGRATE_CAPABILITIES: dict[str, str] = {
    "events": "moves (progress events)",
    "pause-before-switchover": "moves (switch-over waits for the disks)",
    "dirty-bitmaps": "moves of replicated VMs (bitmaps travel with the VM)",
}


def parse_qemu_version(text: str) -> tuple[int, int, int] | None:
    """``"7.2.22 (Debian 1:7.2+dfsg-7)"`` -> ``(7, 2, 22)``; None if it holds no version."""
    found = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    if found is None:
        return None
    major, minor, micro = found.groups()
    return int(major), int(minor), int(micro or 0)


def qemu_version_check(version: str, *, machine_type: str, machine_types: Sequence[str] | None
                       ) -> Check:  # fmt: skip
    """QEMU's version, and that it has the machine type of the host's functional level."""
    parsed = parse_qemu_version(version)
    if parsed is None:
        return Check("qemu", Status.FAIL, f"cannot tell QEMU's version from {version!r}",
                     INSTALL_QEMU)  # fmt: skip
    if parsed[:2] < MIN_QEMU:
        return Check("qemu", Status.FAIL, f"QEMU {version} is older than ferry needs "
                     f"({MIN_QEMU[0]}.{MIN_QEMU[1]})", INSTALL_QEMU)  # fmt: skip
    if machine_types is not None and machine_type not in machine_types:
        return Check("qemu", Status.FAIL, f"QEMU {version} has no machine type {machine_type}, "
                     "which this host's functional level needs",
                     f"{INSTALL_QEMU}, or lower functional_level in host.toml")  # fmt: skip
    return Check("qemu", Status.OK, f"QEMU {version} (machine type {machine_type})")


def qemu_features_check(commands: Iterable[str] | None, capabilities: Iterable[str] | None,
                        *, error: str = "") -> Check:  # fmt: skip
    """The QMP commands and migration capabilities ferry uses, against what QEMU offers."""
    if commands is None or capabilities is None:
        return Check("qemu_features", Status.FAIL,
                     f"cannot ask QEMU what it supports: {error or 'no answer'}",
                     f"check that the QEMU binary in host.toml runs; {INSTALL_QEMU}")  # fmt: skip
    have, caps = set(commands), set(capabilities)
    missing = [f"{c} ({why})" for c, why in QMP_COMMANDS.items() if c not in have]
    missing += [f"capability {c} ({why})" for c, why in MIGRATE_CAPABILITIES.items()
                if c not in caps]  # fmt: skip
    if missing:
        return Check("qemu_features", Status.FAIL, "QEMU lacks " + "; ".join(missing),
                     INSTALL_QEMU)  # fmt: skip
    return Check(
        "qemu_features",
        Status.OK,
        f"all {len(QMP_COMMANDS)} QMP commands and "
        f"{len(MIGRATE_CAPABILITIES)} migration capabilities ferry uses are there",
    )


# -- KVM ---------------------------------------------------------------------------------


def kvm_check(*, configured: str, accelerator: str, dev_kvm: bool, probe: str | None) -> Check:
    """What guests run under, and why. ``probe``: the cached boot probe's verdict, if any."""
    if accelerator == "kvm":
        how = "the boot probe says guests boot" if probe == "kvm" else f"accelerator = {configured}"
        return Check("kvm", Status.OK, f"guests run under KVM ({how})")
    if configured == "tcg":
        return Check("kvm", Status.OK, "accelerator = \"tcg\" in host.toml: guests run emulated "
                     "(slow; fine for a lab)")  # fmt: skip
    if not dev_kvm:
        return Check("kvm", Status.WARN, "/dev/kvm is missing or not writable: guests run "
                     "emulated (TCG), many times slower",
                     "enable virtualisation in the firmware, load kvm_intel/kvm_amd, and give "
                     "the agent's user the kvm group")  # fmt: skip
    return Check("kvm", Status.WARN, "/dev/kvm is there but a guest did not boot under it "
                 "(nested or broken KVM): guests run emulated (TCG)",
                 "fix nested virtualisation, then delete accelerator.json in the data dir and "
                 "restart the agent to probe again")  # fmt: skip


# -- certificates ----------------------------------------------------------------------

CERT_WARN_DAYS = 30


def cert_check(name: str, what: str, not_after: dt.datetime | None, now: dt.datetime, *,
               remedy: str, error: str = "") -> Check:  # fmt: skip
    """A certificate's expiry: fail once expired (or unreadable), warn under 30 days."""
    if not_after is None:
        return Check(name, Status.FAIL, f"cannot read the {what}: {error}", remedy)
    left = not_after - now
    day = not_after.date().isoformat()
    if left <= dt.timedelta(0):
        return Check(name, Status.FAIL, f"the {what} expired on {day}: TLS to and from this "
                     "host is refused", remedy)  # fmt: skip
    if left < dt.timedelta(days=CERT_WARN_DAYS):
        return Check(name, Status.WARN, f"the {what} expires in {left.days} days ({day})", remedy)
    return Check(name, Status.OK, f"the {what} is valid until {day} ({left.days} days)")


# -- free space --------------------------------------------------------------------------

GiB = 1024**3
SPACE_WARN_FRACTION, SPACE_WARN_BYTES = 0.10, 5 * GiB
SPACE_FAIL_FRACTION, SPACE_FAIL_BYTES = 0.02, 1 * GiB


def space_check(name: str, what: str, path: str, free: int | None, total: int | None, *,
                error: str = "") -> Check:  # fmt: skip
    """Free space where ferry writes: fail under 2 % and 1 GiB, warn under 10 % and 5 GiB.

    Both bounds must be crossed: 10 % of a 20 TiB array is plenty, and 5 GiB
    left on a 30 GiB disk is a third of it.
    """
    if free is None or total is None:
        return Check(name, Status.FAIL, f"cannot see {what} {path}: {error}",
                     f"create {path} or fix its path in the configuration")  # fmt: skip
    share = free / total if total else 0.0
    said = f"{what} {path}: {free / GiB:.1f} GiB free of {total / GiB:.1f} GiB ({share:.0%})"
    remedy = (
        f"free space on the filesystem of {path} (old recovery points: "
        "'ferry replication set --recovery-points'; exports; unused disks), or grow it"
    )
    if share < SPACE_FAIL_FRACTION and free < SPACE_FAIL_BYTES:
        return Check(name, Status.FAIL, said + ": writes (disks, replicas) will fail", remedy)
    if share < SPACE_WARN_FRACTION and free < SPACE_WARN_BYTES:
        return Check(name, Status.WARN, said, remedy)
    return Check(name, Status.OK, said)


# -- networks and etcd -------------------------------------------------------------------


def bridge_check(network: str, bridge: str, netns: str | None, exists: bool) -> Check:
    where = f" in namespace {netns}" if netns else ""
    name = f"network:{network}"
    if exists:
        return Check(name, Status.OK, f"network {network}: bridge {bridge}{where} exists")
    return Check(name, Status.FAIL, f"network {network}: bridge {bridge}{where} does not exist; "
                 "VMs with a NIC on it cannot start or move here",
                 f"create it (ip link add {bridge} type bridge; ip link set {bridge} up) or "
                 f"'ferry host network remove {network}'")  # fmt: skip


def etcd_check(cluster: str, *, error: str | None, latency_s: float) -> Check:
    name = f"etcd:{cluster}"
    if error is not None:
        return Check(name, Status.FAIL, f"cluster {cluster}: etcd does not answer: {error}; this "
                     "node cannot renew its lease and will fence its VMs",
                     "check the etcd members ('etcdctl endpoint health') and the network "
                     "between this host and them")  # fmt: skip
    if latency_s > 1.0:
        return Check(name, Status.WARN, f"cluster {cluster}: etcd answered in {latency_s:.1f}s; "
                     "slow answers eat into the lease", "check etcd's disk and load")  # fmt: skip
    return Check(name, Status.OK, f"cluster {cluster}: etcd answered in {latency_s * 1000:.0f} ms")


# -- clocks ------------------------------------------------------------------------------

SKEW_WARN_S, SKEW_FAIL_S = 1.0, 5.0
_WHY_CLOCKS = ("recovery point times, replication lag/RPO and cluster lease and event "
               "times are compared across hosts, and certificates are checked against "
               "each host's clock")  # fmt: skip


@dataclass(frozen=True)
class ClockSample:
    """One host's clock as the client saw it, as Unix times (NTP's four timestamps).

    The client sent at ``before`` and had the answer at ``after`` (its
    clock); the agent got the request at ``received`` and answered at
    ``sent`` (its clock). The agent's work in between (a QEMU probe may take
    seconds on a loaded host) is neither skew nor uncertainty.
    """

    before: float
    received: float
    sent: float
    after: float

    @property
    def offset(self) -> float:
        """The agent's clock less the client's (NTP's offset)."""
        return ((self.received - self.before) + (self.sent - self.after)) / 2

    @property
    def uncertainty(self) -> float:
        """Half the time on the network: the offset is right to within this."""
        return max(0.0, (self.after - self.before) - (self.sent - self.received)) / 2


def clock_checks(samples: Mapping[str, ClockSample]) -> list[Check]:
    """Each host's clock against the others' (their median; one host: the client's).

    The round trip's half is given to the host (a slow answer is not skew).
    """
    if not samples:
        return []
    offsets = {host: s.offset for host, s in samples.items()}
    against = "the other hosts" if len(samples) > 1 else "this client"
    reference = statistics.median(offsets.values()) if len(samples) > 1 else 0.0
    checks = []
    for host, sample in sorted(samples.items()):
        skew = offsets[host] - reference
        beyond = max(0.0, abs(skew) - sample.uncertainty)
        said = f"clock {'ahead of' if skew > 0 else 'behind'} {against} by {abs(skew):.3f}s"
        remedy = f"run NTP (chrony or systemd-timesyncd) on every host: {_WHY_CLOCKS}"
        if beyond > SKEW_FAIL_S:
            checks.append(Check("clock", Status.FAIL, said, remedy, host))
        elif beyond > SKEW_WARN_S:
            checks.append(Check("clock", Status.WARN, said, remedy, host))
        else:
            checks.append(Check("clock", Status.OK, said, host=host))
    return checks


def unreachable_check(host: str, error: str) -> Check:
    return Check("agent", Status.FAIL, f"the agent does not answer: {error}",
                 "start it (systemctl start ferry-agent) and check its log", host)  # fmt: skip
