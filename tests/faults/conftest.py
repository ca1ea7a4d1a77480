"""Fault suites: the short form by default, the long form with ``FERRY_FAULTS=full``.

``FERRY_FAULTS=off`` leaves them out.

Each module counts what its runs did in a :class:`Tally` (runs, lost guest
records, VMs running on two hosts, bad recovery point chains, corrupted
streams sent and detected, operations left neither completable nor
cancellable) and, at its end, appends the tally as one JSON line to the file
named by ``FERRY_FAULTS_REPORT`` (if set); ``docs/reliability.md`` quotes
those lines. The long form runs for hours, so each run also appends the
tally so far (``"partial": true``) to ``FERRY_FAULTS_REPORT`` + ``.progress``:
a long run cut short still leaves its figures. ``FERRY_FAULTS_RUNS=N`` sets
the long form's runs per phase (default 50); ``FERRY_FAULTS_ONLY``
runs only the cases named, N times each, to chase a defect (kill_move:
``victim@phase``, ``*`` for the four victims in turn; kill_failover:
``kind:victim@phase``; comma-separated). The helpers here check the
invariants after each run, through the API (never a mocked QEMU or etcd).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ferry.client.fleet import Fleet
from ferry.client.settings import load_settings
from tests.conftest import LabEnv

FULL = os.environ.get("FERRY_FAULTS") == "full"
# FERRY_FAULTS=off leaves the suites out (a quick local run of everything else).
collect_ignore_glob = ["test_*.py"] if os.environ.get("FERRY_FAULTS") == "off" else []
FULL_RUNS = int(os.environ.get("FERRY_FAULTS_RUNS", "50"))  # per phase in the long form
ONLY = os.environ.get("FERRY_FAULTS_ONLY", "")  # the cases named only (see above)
SETTLE_S = 90.0
ACTIVE_JOB_STATES = ("running", "cancelling")
SEQ_LINE = re.compile(r"^seq (\d+)$", re.MULTILINE)


def runs(short: int) -> int:
    """Runs per phase: ``short`` in CI, FULL_RUNS with FERRY_FAULTS=full."""
    return FULL_RUNS if FULL else short


# The long form loops for hours. The short form's tests took up to 290 s at
# load 25 (the suite's default timeout is 300 s), so they get 600 s.
LONG_TIMEOUT = pytest.mark.timeout(8 * 3600 if FULL else 600)


@dataclass
class Tally:
    suite: str
    runs: int = 0
    lost_records: int = 0
    double_running: int = 0
    bad_chains: int = 0
    corrupt_sent: int = 0
    corrupt_detected: int = 0
    stuck_operations: int = 0
    half_written_left: int = 0  # files or entries a failed operation left behind
    by_phase: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def ran(self, phase: str) -> None:
        self.runs += 1
        self.by_phase[phase] = self.by_phase.get(phase, 0) + 1
        report = os.environ.get("FERRY_FAULTS_REPORT")
        if report:  # the tally so far: what a long run cut short still shows
            line = dict(asdict(self), form="full" if FULL else "short", partial=True,
                        at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))  # fmt: skip
            with Path(report + ".progress").open("a") as out:
                out.write(json.dumps(line) + "\n")


@pytest.fixture(scope="module")
def tally(request: pytest.FixtureRequest) -> Iterator[Tally]:
    found = Tally(suite=request.module.__name__.rsplit(".", 1)[-1])
    started = time.monotonic()
    yield found
    report = os.environ.get("FERRY_FAULTS_REPORT")
    if report:
        line = dict(asdict(found), form="full" if FULL else "short",
                    seconds=round(time.monotonic() - started))  # fmt: skip
        with Path(report).open("a") as out:
            out.write(json.dumps(line) + "\n")


def api(env: LabEnv, host: str, method: str, path: str, **query: str) -> Any:
    """One call to a host's agent, in this process (cheaper than a CLI start-up)."""

    async def call() -> Any:
        async with Fleet(load_settings(env.home)) as fleet:
            client = fleet.client(host)
            if method == "GET":
                return await client.get(path, **query)
            return await client.call(method, path)

    # A call that meets an agent this suite just SIGKILLed leaves aiohttp a
    # transport that is closed only when collected ("unclosed transport"):
    # collect it here, where that is expected, so it cannot fail a later test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            return asyncio.run(call())
        finally:
            gc.collect()


def host_names(env: LabEnv) -> list[str]:
    return [h.name for h in env.lab.hosts()]


def running_on(env: LabEnv, name: str) -> list[str]:
    """Hosts whose agent says VM ``name`` runs there (not as an incoming copy)."""
    where = []
    for host in host_names(env):
        try:
            vms = api(env, host, "GET", "/v1/vms")
        except Exception:  # an agent down counts as not running it; the caller restarts it
            continue
        if any(v["name"] == name and v["state"] == "running" and not v.get("incoming")
               for v in vms):  # fmt: skip
            where.append(host)
    return where


def jobs_of(env: LabEnv, uuid: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for host in host_names(env):
        found += [dict(j, host=host) for j in api(env, host, "GET", "/v1/jobs")
                  if j.get("vm_uuid") == uuid]  # fmt: skip
    return found


def settle_jobs(env: LabEnv, uuid: str, tally: Tally, timeout: float = SETTLE_S) -> None:
    """Wait until every job of the VM ended; cancel one that does not; count the stuck."""
    deadline = time.monotonic() + timeout
    cancelled: set[str] = set()
    while True:
        active = [j for j in jobs_of(env, uuid) if j["state"] in ACTIVE_JOB_STATES]
        if not active:
            return
        now = time.monotonic()
        if now > deadline:
            if all(j["id"] in cancelled for j in active):
                tally.stuck_operations += len(active)
                tally.notes.append(f"stuck: {[(j['kind'], j['state']) for j in active]}")
                return
            for job in active:
                if job["id"] not in cancelled:
                    env.cli("job", "cancel", job["id"], "--host", job["host"], check=False)
                    cancelled.add(job["id"])
            deadline = now + timeout / 2
        time.sleep(0.5)


def boot_writing_guest(env: LabEnv, name: str) -> None:
    """The suites' guest on host-1: a 128 MiB test guest whose 64 MiB disk takes its records."""
    env.cli("vm", "create", name, "--host", "host-1", "--guest", "test", "--memory", "128M",
            "--disk", "64M", "--start")  # fmt: skip
    env.wait_console(name, lambda t: t.count("seq ") >= 2, timeout=240)


def lab_up(env: LabEnv) -> None:
    """What an admin runs after a crash: idempotent, starts the agents that are down."""
    env.lab.up(len(env.lab.hosts()))


def check_chain(files: list[Path], tally: Tally) -> bool:
    """``qemu-img check`` of the newest file of a chain (its backing files with it)."""
    if not files:
        return True
    newest = max(files, key=lambda p: p.stat().st_mtime)
    done = subprocess.run(["qemu-img", "check", "-U", str(newest)], capture_output=True,
                          text=True)  # fmt: skip
    info = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json",
                           str(newest)], capture_output=True, text=True)  # fmt: skip
    linked = info.returncode == 0 and len(json.loads(info.stdout)) >= 1
    if done.returncode != 0 or not linked:
        tally.bad_chains += 1
        tally.notes.append(f"chain {newest.name}: {done.stdout.strip()[-200:]}")
        return False
    return True


def last_seq(text: str) -> int:
    return max((int(m.group(1)) for m in SEQ_LINE.finditer(text)), default=0)


def printed_seq(env: LabEnv, name: str) -> int:
    """The newest ``seq N`` the guest printed (record N is durable) on its current host."""
    try:
        return last_seq(env.console(name))
    except Exception:
        return 0
