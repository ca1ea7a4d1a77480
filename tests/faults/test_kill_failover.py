"""SIGKILL of an agent or a QEMU in each kind of failover (test, unplanned, planned), looped.

One test guest on host-1, replicated to host-2 (each host accepts the other
as a primary, so a planned failover can flow back). Each run starts the
failover as its own ``ferry`` process, watches its job through the API of
the host that runs it (the replica for ``test`` and ``start``, the primary
for ``planned``) and kills the victim by pid as soon as the job reaches the
phase wanted (``phase_at_kill`` is the phase seen then; a job that ended
first counts under ``ended-before-kill``). Then, as an admin would: ``lab
up``, the documented command (``failover stop-test``, ``failover cancel``,
or the planned failover retried), and the checks: the VM runs on exactly one
host, no ``<VM>-test`` is left, every job ends or is cancelled, the replica's
recovery point chain passes ``qemu-img check``, the running disk holds every
record the guest reported durable before the kill, and a retry of the same
failover completes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LabEnv
from tests.faults.conftest import (
    FULL,
    LONG_TIMEOUT,
    ONLY,
    Tally,
    api,
    boot_writing_guest,
    check_chain,
    lab_up,
    printed_seq,
    running_on,
    runs,
    settle_jobs,
)
from tests.faults.test_kill_move import check_records, qemu_pid_on, recover

# Both defects this module found are fixed: a planned failover's -S QEMU killed
# before its first 'cont' was never ended after the restart; and a primary-agent
# kill in a planned failover's final-cycle (a resync after the cancelled
# unplanned run) left a replication-resync job 'running' that nothing ended and
# job cancel refused, and the retry was refused while replication resynchronised
# (docs/reliability.md). The short plan kills in that final-cycle.
pytestmark = pytest.mark.integration

VM = "kfail"
TEST_VM = f"{VM}-test"
# kind -> (job kind, phases in order, victims)
KINDS: dict[str, tuple[str, list[str], list[str]]] = {
    "test": ("failover-test", ["starting", "creating-overlays", "starting-vm"],
             ["replica-agent", "replica-qemu"]),
    "unplanned": ("failover-start", ["starting", "checking-primary", "creating-overlays",
                                     "starting-vm"], ["replica-agent", "replica-qemu"]),
    "planned": ("failover-planned", ["checking", "shutting-down", "final-cycle",
                                     "starting-on-replica"],
                ["primary-agent", "replica-agent", "primary-qemu"]),
}  # fmt: skip
SHORT_PLAN = [("test", "replica-agent", "creating-overlays"),
              ("unplanned", "replica-qemu", "starting-vm"),
              ("planned", "primary-agent", "final-cycle")]  # fmt: skip


@pytest.fixture(scope="module")
def storage(lab_env: LabEnv, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("replicas")
    for me, other in (("host-1", "host-2"), ("host-2", "host-1")):
        lab_env.cli("replica-server", "enable", "--host", me, "--storage", str(root / me),
                    "--allow", other)  # fmt: skip
    return root


@pytest.fixture(scope="module")
def guest(lab_env: LabEnv, storage: Path) -> Iterator[str]:
    cli = lab_env.cli
    boot_writing_guest(lab_env, VM)
    cli("replication", "enable", VM, "--replica", "host-2", "--frequency", "5m")
    yield VM
    for host in ("host-1", "host-2"):
        cli("replication", "remove", VM, "--host", host, check=False)
    for name in (TEST_VM, VM):
        for host in ("host-1", "host-2"):
            cli("vm", "delete", name, "--force", "--host", host, check=False)


def roles(env: LabEnv) -> tuple[str, str]:
    status = env.cli.json("replication", "status", VM)
    return str(status["primary"]), str(status["replica"])


def entry(env: LabEnv, host: str, name: str) -> dict[str, Any] | None:
    try:
        found = [v for v in api(env, host, "GET", "/v1/vms") if v["name"] == name]
    except Exception:
        return None
    return found[0] if found else None


def qemu_of(env: LabEnv, host: str, name: str, uuid: str) -> int | None:
    """The VM's QEMU: from /proc while the agent has not said its pid yet, else the API."""
    if name == VM and (pid := qemu_pid_on(env, host, uuid)) is not None:
        return pid
    found = entry(env, host, name)
    if found is None:
        return None
    pid = found.get("pid") or qemu_pid_on(env, host, str(found["uuid"]))
    return int(pid) if pid else None


def new_job(env: LabEnv, host: str, kind: str, known: set[str]) -> dict[str, Any] | None:
    try:
        jobs = api(env, host, "GET", "/v1/jobs")
    except Exception:
        return None
    new = [j for j in jobs if j["kind"] == kind and j["id"] not in known]
    return new[-1] if new else None


def all_job_ids(env: LabEnv) -> set[str]:
    return {j["id"] for h in ("host-1", "host-2") for j in api(env, h, "GET", "/v1/jobs")}


def kill(env: LabEnv, victim: str, primary: str, replica: str, kind: str, uuid: str) -> bool:
    host = primary if victim.startswith("primary") else replica
    if victim.endswith("agent"):
        pid = env.lab.host_named(host).pid()
    else:
        pid = qemu_of(env, host, TEST_VM if kind == "test" and host == replica else VM, uuid)
    if pid is None:
        return False
    os.kill(pid, signal.SIGKILL)
    return True


def ok(env: LabEnv, *args: str) -> bool:
    out = env.cli(*args, "--json", check=False)
    lines = out.stdout.strip().splitlines()
    return out.returncode == 0 and bool(lines)


def run_failover(env: LabEnv, kind: str, victim: str, phase: str, primary: str,
                 replica: str, uuid: str) -> str:  # fmt: skip
    """Start the failover, kill the victim at ``phase``; the phase seen then."""
    job_kind, phases, _ = KINDS[kind]
    args = {"test": ["failover", "test", VM, "--host", replica],
            "unplanned": ["failover", "start", VM, "--host", replica],
            "planned": ["failover", "planned", VM]}[kind]  # fmt: skip
    host = primary if kind == "planned" else replica
    known = all_job_ids(env)
    proc = subprocess.Popen([sys.executable, "-m", "ferry", *args, "--json"],
                            env=dict(os.environ, FERRY_HOME=str(env.home)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)  # fmt: skip
    seen = "ended-before-kill"
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            job = new_job(env, host, job_kind, known)
            now = str(job["phase"]) if job else ""
            if job and job["state"] != "running":
                break
            reached = now in phases and phases.index(now) >= phases.index(phase)
            if reached and kill(env, victim, primary, replica, kind, uuid):
                seen = now
                break
            time.sleep(0.02)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15 if seen != "ended-before-kill" else 120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return seen


def one_run(env: LabEnv, storage: Path, tally: Tally, kind: str, victim: str,
            phase: str) -> None:  # fmt: skip
    cli = env.cli
    primary, replica = roles(env)
    uuid = env.vm(VM, primary)["uuid"]
    durable = printed_seq(env, VM)
    if kind == "unplanned":  # the primary is lost: its VM is down
        cli("vm", "kill", VM, "--host", primary)
    seen = run_failover(env, kind, victim, phase, primary, replica, uuid)
    tally.ran(f"{kind}:{victim}@{seen}")
    took = time.monotonic()
    lab_up(env)
    settle_jobs(env, uuid, tally)
    # The documented way out, then a retry that must complete.
    if kind == "test":
        cli("failover", "stop-test", VM, "--host", replica, check=False)
        assert entry(env, replica, TEST_VM) is None, f"{TEST_VM} left after stop-test"
        if not ok(env, "failover", "test", VM, "--host", replica):
            tally.stuck_operations += 1
            tally.notes.append(f"{kind}:{victim}@{seen}: a retried test failover failed")
        if not ok(env, "failover", "stop-test", VM, "--host", replica):
            tally.stuck_operations += 1
            tally.notes.append(f"{kind}:{victim}@{seen}: stop-test after the retry failed")
    elif kind == "unplanned":
        status = cli.json("replication", "status", VM, "--host", replica)
        if status["state"] != "replicating" or entry(env, replica, VM)["state"] != "replica":
            cli("failover", "cancel", VM, "--host", replica, check=False)
        if not ok(env, "failover", "start", VM, "--host", replica):
            tally.stuck_operations += 1
            tally.notes.append(f"{kind}:{victim}@{seen}: a retried failover start failed")
        if not ok(env, "failover", "cancel", VM, "--host", replica):
            tally.stuck_operations += 1
            tally.notes.append(f"{kind}:{victim}@{seen}: cancel after the retry failed")
        assert entry(env, replica, VM)["state"] == "replica"  # type: ignore[index]
    elif (roles(env)[0] == primary and running_on(env, VM) != [replica]
          and not ok(env, "failover", "planned", VM)):  # the retry  # fmt: skip
        tally.stuck_operations += 1
        tally.notes.append(f"{kind}:{victim}@{seen}: a retried planned failover failed")
    settle_jobs(env, uuid, tally)
    where = recover(env, VM, tally)
    tally.notes.append(f"{kind}:{victim}@{seen}: recovered in {time.monotonic() - took:.0f} s")
    env.wait_console(VM, lambda t: "seq " in t, host=where, timeout=120)
    check_records(env, VM, where, durable, tally)
    new_primary, new_replica = roles(env)
    check_chain(sorted((storage / new_replica / uuid).glob("p*-disk0.qcow2")), tally)
    if kind != "planned":
        assert where == primary == new_primary, (where, primary, new_primary)
    assert entry(env, new_replica, TEST_VM) is None


@LONG_TIMEOUT
def test_kill_in_each_kind_of_failover(lab_env: LabEnv, storage: Path, guest: str,
                                       tally: Tally) -> None:  # fmt: skip
    # FERRY_FAULTS_ONLY=kind:victim@phase[,...]: those cases, N runs each.
    if ONLY:
        plan = []
        for case in ONLY.split(","):
            kind, _, rest = case.partition(":")
            victim, _, phase = rest.partition("@")
            assert kind in KINDS and victim in KINDS[kind][2] and phase in KINDS[kind][1], (
                f"{case}: no such case")  # fmt: skip
            plan += [(kind, victim, phase)] * runs(1)
    elif FULL:
        plan = [(kind, victims[i % len(victims)], p)
                for kind, (_, phases, victims) in KINDS.items()
                for p in phases for i in range(runs(1))]  # fmt: skip
    else:
        plan = SHORT_PLAN
    out = lab_env.cli("replication", "sync", VM, "--json").stdout
    assert json.loads(out.strip().splitlines()[-1])["result"] == "ok"
    for kind, victim, phase in plan:
        one_run(lab_env, storage, tally, kind, victim, phase)
    assert tally.lost_records == 0 and tally.double_running == 0, tally.notes
    assert tally.stuck_operations == 0 and tally.bad_chains == 0, tally.notes
