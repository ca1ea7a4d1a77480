"""Scrape cost of ``GET /metrics``: this hour's cycles against the day's, same process.

Run: ``.venv/bin/python bench/bench_metrics_scrape.py [--vms 50] [--frequency 30]``

A real catalog holds ``--vms`` VMs replicating as primaries, each with a day
of cycle records at ``--frequency`` seconds (what the catalog keeps). One
agent's registry is scraped (``generate_latest``) with the collector as built,
which reads the health window's cycles (``StateCollector._recent_cycles``),
and with a baseline collector that reads every cycle of the day, as
``replication status`` does. Printed: milliseconds per scrape of each and the
ratio, plus the size of the text. The scrape runs on the agent's event loop
(the catalog is one SQLite connection), so its time is time the loop is busy.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from prometheus_client import generate_latest

from ferry.adapters.catalog import Catalog
from ferry.core.relationship import Relationship, Role
from ferry.core.replication import CycleKind, CycleRecord, ReplicationState
from ferry.core.spec import DiskSpec, VmSpec
from ferry.core.vmstate import VmState
from ferry.host.metrics.collector import StateCollector
from ferry.host.metrics.recorder import MetricsRecorder


class WholeDay(StateCollector):
    """The baseline: every cycle the catalog keeps, as 'replication status' reads them."""

    def _recent_cycles(self, rel: Relationship, now: float) -> list[CycleRecord]:
        return self.catalog.cycles(rel.vm_uuid)


def fill(catalog: Catalog, vms: int, frequency: int, now: float) -> None:
    for i in range(vms):
        uuid = f"b0b0b0b0-0000-4000-8000-{i:012d}"
        disk = DiskSpec(path=f"/srv/{uuid}/disk0.qcow2", size=1 << 30, format="qcow2")
        spec = VmSpec(uuid=uuid, name=f"vm{i}", config_version=1, memory=1 << 28, disks=(disk,))
        catalog.add_vm(spec, VmState.RUNNING)
        catalog.put_relationship(Relationship(
            vm_uuid=uuid, vm_name=f"vm{i}", role=Role.PRIMARY, primary="h1", replica="h2",
            replica_url="https://h2", state=ReplicationState.REPLICATING,
            frequency_s=frequency, recovery_points=4, created=now - 86400))  # fmt: skip
        count = 86400 // frequency
        catalog.replace_cycles(uuid, [
            CycleRecord(now - 86400 + frequency * k, True, CycleKind.SUCCESS, 4096, 0.3)
            for k in range(count)])  # fmt: skip


def per_scrape(recorder: MetricsRecorder, rounds: int) -> tuple[float, int]:
    started = time.perf_counter()
    size = 0
    for _ in range(rounds):
        size = len(generate_latest(recorder.registry))
    return (time.perf_counter() - started) / rounds, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=50)
    parser.add_argument("--frequency", type=int, default=30, help="seconds between cycles")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    now = time.time()
    with tempfile.TemporaryDirectory() as root:
        catalog = Catalog(Path(root))
        fill(catalog, args.vms, args.frequency, now)
        built, baseline = MetricsRecorder(), MetricsRecorder()
        for recorder, kind in ((built, StateCollector), (baseline, WholeDay)):
            recorder.registry.register(
                kind(host="h1", catalog=catalog, jobs=list, replica_state=lambda uuid: None)
            )  # type: ignore[arg-type,return-value]
        per_scrape(built, 1)
        for run in range(2):  # twice: the load of the machine shows in both alike
            ours, size = per_scrape(built, args.rounds)
            theirs, _ = per_scrape(baseline, args.rounds)
            print(f"run {run}: {args.vms} VMs, a day of cycles at {args.frequency}s: "
                  f"{ours * 1000:.0f} ms per scrape (this hour), {theirs * 1000:.0f} ms "
                  f"(the whole day), {theirs / ours:.1f}x; {size} bytes")  # fmt: skip
        catalog.close()


if __name__ == "__main__":
    main()
