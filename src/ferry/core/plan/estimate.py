"""How long each option takes for one VM, and how long the VM is down: a pure model.

Theory of operation, live migration (what ``ferry vm move`` does, see
:mod:`ferry.host.migration.source`): a fixed set-up (the destination QEMU
is launched and answers; the kernel and initrd travel), then with copied
storage the disks are mirrored (``blockdev-mirror sync=full``: the allocated
data crosses, holes do not), then QEMU's pre-copy sends memory in passes.
The first pass reads every page and sends the ones that are not zero; each
next pass sends what the guest dirtied during the one before. The stream
switches over once what is left fits in QEMU's ``downtime-limit`` (300 ms
unless the move says otherwise) at the stream's rate; then the guest is
paused for that last bit plus a fixed device-state and resume time. With a
dirty rate at or above the stream's rate the passes never shrink: ferry's
moves do not throttle the guest (no auto-converge), so such a move does not
converge and the model says so.

The stream's rate is the measured link (the agents' TLS probe) times a
factor for QEMU's own TLS stream, capped by ``migration_max_bandwidth``
(1 GiB/s by default). The constants are :class:`Calibration`, measured on
the lab (docs/architecture.md, "Planner"); the benchmark of planned against
measured moves checks them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ferry.core.plan.plan_file import Option

MAX_PASSES = 30  # QEMU keeps going; the model stops counting here


@dataclass(frozen=True)
class Calibration:
    """The model's constants, measured on this lab (2 hosts on loopback, TCG test
    guests, load average 14-18 from other work): see docs/architecture.md, "Planner"."""

    setup_s: float = 1.5  # preparing: the destination QEMU launched and answering, files
    memory_fixed_s: float = 1.5  # the stream's start, TLS, pre-switchover, finish, resume
    switch_s: float = 0.2  # QEMU's downtime for device state beyond the last pages
    downtime_limit_s: float = 0.3  # QEMU's default downtime-limit
    migration_cap_bps: float = 1024.0**3  # host.toml migration_max_bandwidth default
    stream_factor: float = 0.9  # QEMU's TLS stream against the agents' probe
    zero_page_bps: float = 512.0 * 1024**2  # how fast a pass gets over zero pages
    used_fraction: float = 0.4  # of memory not zero, when not sampled (test guests: 0.2-0.6)
    disk_fixed_s: float = 2.0  # destination disks made, NBD exports, mirrors ready
    disk_factor: float = 1.0  # the NBD mirror against the stream's rate
    local_disk_bps: float = 400.0 * 1024**2  # qemu-img convert on one host (export, import)
    stop_s: float = 2.0  # a clean shutdown of the guest
    start_s: float = 1.0  # QEMU up again on the new host (not the guest's boot)


DEFAULT = Calibration()


@dataclass(frozen=True)
class Workload:
    """What one VM brings to the estimate."""

    memory: int  # bytes
    dirty_rate_bps: float  # measured; 0 when off or unknown
    disk_bytes: int  # allocated bytes of its disks
    copy_disks: bool  # live migration without shared storage
    bandwidth_bps: float  # the measured link to the destination
    running: bool = True
    downtime_limit_s: float | None = None  # a policy's max-downtime, given to the move
    memory_used: int | None = None  # bytes not zero (sampled); None: the calibrated share


@dataclass(frozen=True)
class Estimate:
    total_s: float
    downtime_s: float
    converges: bool = True
    passes: int = 0
    disk_s: float = 0.0
    memory_s: float = 0.0


def stream_bps(w: Workload, cal: Calibration = DEFAULT) -> float:
    return max(1.0, min(w.bandwidth_bps * cal.stream_factor, cal.migration_cap_bps))


def live_migration(w: Workload, cal: Calibration = DEFAULT) -> Estimate:
    """Pre-copy as QEMU does it, pass by pass."""
    rate = stream_bps(w, cal)
    disk_s = cal.disk_fixed_s + w.disk_bytes / (rate * cal.disk_factor) if w.copy_disks else 0.0
    limit = w.downtime_limit_s or cal.downtime_limit_s
    used = min(w.memory, w.memory_used if w.memory_used is not None
               else int(w.memory * cal.used_fraction))  # fmt: skip
    pass_s = used / rate + (w.memory - used) / cal.zero_page_bps
    memory_s, passes = cal.memory_fixed_s + pass_s, 1
    # While the disks copy, the guest dirties memory too, but QEMU starts the
    # memory stream only once the mirrors are ready: the first pass starts clean.
    left = min(w.dirty_rate_bps * pass_s, w.memory)
    converges = True
    while left / rate > limit:
        next_s = left / rate
        if next_s >= pass_s * 0.98 or passes >= MAX_PASSES:
            converges = False
            break
        pass_s = next_s
        memory_s += pass_s
        passes += 1
        left = min(w.dirty_rate_bps * pass_s, w.memory)
    downtime = left / rate + cal.switch_s
    total = cal.setup_s + disk_s + memory_s + downtime
    return Estimate(round(total, 3), round(downtime, 3), converges, passes,
                    round(disk_s, 3), round(memory_s, 3))  # fmt: skip


def export_import(w: Workload, cal: Calibration = DEFAULT) -> Estimate:
    """Off for all of it: stop, export, carry the files over the link, import, start."""
    disk = w.disk_bytes
    work = 2 * disk / cal.local_disk_bps + disk / stream_bps(w, cal)
    # A running VM is stopped first and started again where it landed.
    stop = cal.stop_s + cal.start_s if w.running else 0.0
    total = stop + work
    return Estimate(round(total, 3), round(total if w.running else 0.0, 3), disk_s=round(work, 3))


def in_place(w: Workload, cal: Calibration = DEFAULT) -> Estimate:
    """ferry's in-place upgrade with VMs running: a live migration into a new QEMU here
    (``vm refresh``; the ``vm upgrade-version`` after it, or alone for an off VM, is a
    catalog write and costs nothing)."""
    local = Workload(w.memory, w.dirty_rate_bps, 0, False, cal.migration_cap_bps, w.running,
                     w.downtime_limit_s, w.memory_used)  # fmt: skip
    return live_migration(local, cal) if w.running else Estimate(0.0, 0.0)


def copy_cluster_roles(w: Workload, cal: Calibration = DEFAULT) -> Estimate:
    """The VM stops on the old cluster and starts on the new one; its disks stay put."""
    down = cal.stop_s + cal.start_s if w.running else 0.0
    return Estimate(round(cal.setup_s + down, 3), round(down, 3))


def move_replica(w: Workload, cal: Calibration = DEFAULT) -> Estimate:
    """The replica's disks and points cross to the new replica host; the VM runs on."""
    return Estimate(round(cal.setup_s + w.disk_bytes / stream_bps(w, cal), 3), 0.0)


MODELS = {
    Option.LIVE_MIGRATION: live_migration,
    Option.EXPORT_IMPORT: export_import,
    Option.IN_PLACE: in_place,
    Option.COPY_CLUSTER_ROLES: copy_cluster_roles,
    Option.MOVE_REPLICA: move_replica,
}


def estimate(option: Option, w: Workload, cal: Calibration = DEFAULT) -> Estimate:
    return MODELS[option](w, cal)
