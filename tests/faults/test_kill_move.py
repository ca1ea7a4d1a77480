"""SIGKILL of an agent or a QEMU, on either side, at every phase of a live move, looped.

One test guest moves back and forth between host-1 and host-2 (the disk
copied, the bandwidth capped so each phase lasts long enough to be seen).
The move job's phase is watched through the source agent's API and the
victim is killed by pid as soon as the job reaches the phase wanted
(``phase_at_kill`` is the phase seen then; a move that ended first counts
under ``ended-before-kill``). Then, as an admin would: ``lab up`` (restarts
the agent killed), ``vm start`` if the guest's QEMU is gone, and the checks:
the VM runs on exactly one host, every job of it ends or is cancelled, the
disk holds every record the guest reported durable before the kill, and the
other host keeps no entry of it. A last move must succeed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.guest.records import read_records
from tests.conftest import LabEnv, _lab_processes
from tests.faults.conftest import (
    FULL,
    LONG_TIMEOUT,
    ONLY,
    Tally,
    api,
    boot_writing_guest,
    jobs_of,
    lab_up,
    printed_seq,
    running_on,
    runs,
    settle_jobs,
)

pytestmark = pytest.mark.integration

VM = "kmove"
PHASES = ["preparing", "copying-disks", "copying-memory", "switching-over"]
VICTIMS = ["source-agent", "destination-agent", "source-qemu", "destination-qemu"]
BANDWIDTH = "24M"  # 64 MiB of disk and the guest's memory: a few seconds a move


@pytest.fixture(scope="module")
def guest(lab_env: LabEnv) -> Iterator[str]:
    boot_writing_guest(lab_env, VM)
    yield VM
    for host in ("host-1", "host-2"):
        lab_env.cli("vm", "delete", VM, "--force", "--host", host, check=False)


def qemu_pid_on(env: LabEnv, host: str, uuid: str) -> int | None:
    """The QEMU of VM ``uuid`` that ``host``'s agent started (its files are under that host)."""
    marker = f"/hosts/{host}/".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if uuid.encode() in argv and marker in argv and b"qemu-system" in argv:
            return int(entry.name)
    return None


def move_job(env: LabEnv, host: str, uuid: str, known: set[str]) -> dict[str, object] | None:
    try:
        jobs = api(env, host, "GET", "/v1/jobs")
    except Exception:
        return None
    new = [j for j in jobs if j["kind"] == "move" and j.get("vm_uuid") == uuid
           and j["id"] not in known]  # fmt: skip
    return new[-1] if new else None


def log_phase(log: Path, start: int, job_id: str) -> str:
    """The newest phase the source agent logged for move ``job_id`` (``move ID: PHASE``)."""
    with log.open("rb") as handle:
        handle.seek(start)
        found = re.findall(rf"move {job_id}: ([a-z-]+)".encode(), handle.read())
    return found[-1].decode() if found else ""


def kill(env: LabEnv, victim: str, source: str, dest: str, uuid: str) -> bool:
    host = source if victim.startswith("source") else dest
    if victim.endswith("agent"):
        pid = env.lab.host_named(host).pid()
    else:
        pid = qemu_pid_on(env, host, uuid)
    if pid is None:
        return False
    os.kill(pid, signal.SIGKILL)
    return True


def _is_qemu(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system")
    except OSError:
        return False


def snapshot(env: LabEnv) -> Path:
    """What a stuck move leaves to read, written beside the lab: every lab QEMU's TCP
    sockets (``ss``), where each of its threads waits in the kernel, and gdb's
    backtrace of each thread."""
    out = env.lab.root / f"stuck-{time.strftime('%H%M%S')}.txt"
    pids = [pid for pid in _lab_processes(env.lab.root) if _is_qemu(pid)]
    lines = [f"qemu pids: {pids}"]
    sockets = subprocess.run(["ss", "-tanpi"], capture_output=True, text=True).stdout
    lines += [ln for ln in sockets.splitlines() if any(f"pid={p}," in ln for p in pids)]
    for pid in pids:
        for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
            with contextlib.suppress(OSError):
                comm, wchan = ((task / f).read_text().strip() for f in ("comm", "wchan"))
                stack = (task / "stack").read_text().replace("\n", " | ")
                lines.append(f"{pid}/{task.name} {comm}: {wchan} {stack}")
    if shutil.which("gdb"):  # QEMU's own frames, when its symbols are at hand
        for pid in pids:
            with contextlib.suppress(subprocess.SubprocessError):
                lines.append(subprocess.run(
                    ["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt 30"],
                    capture_output=True, text=True, timeout=60).stdout)  # fmt: skip
    out.write_text("\n".join(lines) + "\n")
    return out


def recover(env: LabEnv, name: str, tally: Tally) -> str:
    """Restart what was killed; start the guest if no QEMU runs it; the host it runs on."""
    lab_up(env)
    deadline = time.monotonic() + 90
    started = False
    while True:
        where = running_on(env, name)
        if len(where) > 1:
            tally.double_running += 1
            tally.notes.append(f"{name} running on {where}")
            raise AssertionError(f"{name} runs on two hosts: {where}")
        if where:
            return where[0]
        if time.monotonic() > deadline:
            states = {h: [(v["state"], v.get("incoming")) for v in api(env, h, "GET", "/v1/vms")
                          if v["name"] == name] for h in ("host-1", "host-2")}  # fmt: skip
            dump = snapshot(env)
            raise AssertionError(f"{name} never ran again: {states} (sockets and threads: {dump})")
        if not started:
            for host in ("host-1", "host-2"):
                found = [v for v in api(env, host, "GET", "/v1/vms")
                         if v["name"] == name and not v.get("incoming")]  # fmt: skip
                if found and found[0]["state"] in ("crashed", "off"):
                    env.cli("vm", "start", name, "--host", host)
                    started = True
        time.sleep(0.5)


def check_records(env: LabEnv, name: str, host: str, durable: int, tally: Tally) -> None:
    env.cli("vm", "pause", name, "--host", host)
    try:
        disk = Path(env.vm(name, host)["disks"][0]["path"])
        found = read_records(disk)
        if found.last_seq < durable or found.corrupt:
            tally.lost_records += max(0, durable - found.last_seq)
            tally.notes.append(f"disk at {found.last_seq}, {durable} durable, "
                               f"{found.corrupt} corrupt")  # fmt: skip
    finally:
        env.cli("vm", "resume", name, "--host", host)


def one_run(env: LabEnv, tally: Tally, victim: str, phase: str) -> None:
    (source,) = running_on(env, VM)
    dest = "host-2" if source == "host-1" else "host-1"
    uuid = env.vm(VM, source)["uuid"]
    known = {j["id"] for j in jobs_of(env, uuid)}
    cmd = [sys.executable, "-m", "ferry", "vm", "move", VM, "--to", dest, "--max-bandwidth",
           BANDWIDTH, "--json"]  # fmt: skip
    mover = subprocess.Popen(cmd, env=dict(os.environ, FERRY_HOME=str(env.home)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             stdin=subprocess.DEVNULL)  # fmt: skip
    seen = "ended-before-kill"
    try:
        deadline = time.monotonic() + 120
        log = env.lab.host_named(source).log_path
        log_from = log.stat().st_size
        job_id = ""
        durable = printed_seq(env, VM)  # refreshed while the move copies
        while mover.poll() is None and time.monotonic() < deadline:
            if not job_id:  # the API names the job; its log lines then say each phase at once
                job = move_job(env, source, uuid, known)
                job_id = str(job["id"]) if job else ""
                now = str(job["phase"]) if job else ""
            else:
                now = log_phase(log, log_from, job_id)
            if now in PHASES and PHASES.index(now) < PHASES.index(phase) - 1:
                durable = printed_seq(env, VM)
            if now in PHASES and PHASES.index(now) >= PHASES.index(phase):
                if kill(env, victim, source, dest, uuid):
                    seen = now
                break
            time.sleep(0.02)
        # The job is what must end well; a CLI whose agent died may wait long
        # for its stream, so it gets a moment, then this test ends it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            mover.wait(timeout=15 if seen != "ended-before-kill" else 120)
    finally:
        if mover.poll() is None:
            mover.kill()
            mover.wait()
    tally.ran(f"{victim}@{seen}")
    took = time.monotonic()
    try:
        where = recover(env, VM, tally)
    except AssertionError as exc:
        tally.stuck_operations += 1
        tally.notes.append(f"{victim}@{seen}: {exc}")
        raise
    settle_jobs(env, uuid, tally)
    tally.notes.append(f"{victim}@{seen}: recovered in {time.monotonic() - took:.0f} s")
    check_records(env, VM, where, durable, tally)
    other = dest if where == source else source
    left = [v for v in api(env, other, "GET", "/v1/vms") if v["name"] == VM]
    if left:
        tally.notes.append(f"{other} kept an entry of {VM}: {left[0]['state']}")
        env.cli("vm", "delete", VM, "--force", "--host", other, check=False)
    assert not left, f"{other} kept {VM} after a {victim} kill at {seen}: {left[0]['state']}"


@LONG_TIMEOUT
def test_kill_at_every_phase_of_a_move(lab_env: LabEnv, guest: str, tally: Tally) -> None:
    # Short form (CI's time budget): an agent and a QEMU, the disk copy and the
    # switch-over, and the destination QEMU killed as the disk copy connects (QEMU
    # 7.2 then hung in blockdev-add for ever: see disk_copy.NBD_OPEN_TIMEOUT_S);
    # long form: N runs per phase, the four victims in turn.
    # FERRY_FAULTS_ONLY=victim@phase[,...] (victim * for the four in turn): those cases.
    if ONLY:
        plan = []
        for case in ONLY.split(","):
            victim, _, phase = case.partition("@")
            assert victim in (*VICTIMS, "*") and phase in PHASES, f"{case}: no such case"
            plan += [(VICTIMS[i % 4] if victim == "*" else victim, phase)
                     for i in range(runs(1))]  # fmt: skip
    elif FULL:
        plan = [(VICTIMS[i % 4], p) for p in PHASES for i in range(runs(1))]
    else:
        plan = [("source-agent", "copying-disks"), ("destination-qemu", "copying-disks"),
                ("destination-qemu", "switching-over")]  # fmt: skip
    for victim, phase in plan:
        one_run(lab_env, tally, victim, phase)
    (source,) = running_on(lab_env, VM)
    dest = "host-2" if source == "host-1" else "host-1"
    out = lab_env.cli("vm", "move", VM, "--to", dest, "--json").stdout
    final = json.loads(out.strip().splitlines()[-1])
    assert final["result"] == "ok", final
    assert tally.lost_records == 0 and tally.double_running == 0, tally.notes
    assert tally.stuck_operations == 0, tally.notes
