"""``ferry plan apply`` for real: two lab agents, running test guests moved host-1 -> host-2.

The plan comes from ``ferry plan create``; apply runs as a real process so it
can be killed (SIGKILL: its job goes on at the agent and the next apply finds
it again by id) and interrupted (SIGINT: the step's move is cancelled and the
next apply runs it again); done steps are never redone, and a second apply of
a finished plan says so. Bad plans (edited, stale, a destination without the
capacity) are refused with one line and change nothing. A plan from host-1 to
host-1 is ferry's in-place upgrade: the running VM moves into a fresh QEMU there.
An off VM goes by export/import through --export-dir and lands off on host-2.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.host.config import HostConfig
from tests.conftest import LabEnv, seqs

pytestmark = pytest.mark.integration

M = 1024**2
UNCAPPED = HostConfig.model_fields["migration_max_bandwidth"].default  # host.toml's
EVENT_TIMEOUT_S = 240.0  # a move under TCG at a load of ~15 takes well under a minute


def vm_hosts(env: LabEnv) -> dict[str, tuple[str, str]]:
    """name -> (host, state) of every VM copy that counts (not replicas)."""
    return {vm["name"]: (vm["host"], vm["state"]) for vm in env.cli.json("vm", "list")}


def moves_of(env: LabEnv, vm: str) -> list[dict[str, Any]]:
    return [j for j in env.cli.json("job", "list", "--host", "host-1")
            if j["kind"] == "move" and j["vm"] == vm]  # fmt: skip


def plan_create(env: LabEnv, path: Path) -> dict[str, Any]:
    env.cli("plan", "create", "--from", "host-1", "--to", "host-2", "-o", str(path))
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def state_of(plan: Path) -> dict[str, dict[str, Any]]:
    doc = json.loads(plan.with_name(plan.name + ".state").read_text())
    return {step["key"]: step for step in doc["steps"]}


def ended(pid: int, timeout: float = 60) -> bool:
    """Whether process ``pid`` ends (gone, or a zombie not reaped yet) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return True
        if "\nState:\tZ" in status:
            return True
        time.sleep(0.2)
    return False


Events = list[dict[str, Any]]


def apply_until(env: LabEnv, plan: Path, when: Callable[[dict[str, Any]], bool],
                act: signal.Signals | Callable[[], object]) -> tuple[int, Events]:  # fmt: skip
    """Run ``ferry plan apply PLAN --json`` as a process; at the first event ``when``
    accepts send it signal ``act`` (or call ``act``); return its exit status and
    every event it printed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ferry", "plan", "apply", str(plan), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        env={**os.environ, "FERRY_HOME": str(env.home)},
    )  # fmt: skip
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    pumping = threading.Thread(target=pump, daemon=True)
    pumping.start()
    events: Events = []
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    try:
        while True:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                stderr = proc.stderr.read() if proc.stderr else ""
                raise AssertionError(f"apply ended before the event: {events}, {stderr}")
            events.append(json.loads(line))
            if when(events[-1]):
                if isinstance(act, signal.Signals):
                    proc.send_signal(act)
                else:
                    act()
                break
        code = proc.wait(timeout=EVENT_TIMEOUT_S)
        while (line := lines.get(timeout=10)) is not None:
            events.append(json.loads(line))
    finally:
        if proc.poll() is None:  # only on a failed test: end what this test started
            proc.kill()
            proc.wait()
        # Closed on every way out: a pipe left to the collector warns in a later test.
        pumping.join(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    return code, events


def test_bad_plans_are_refused_with_one_line_and_change_nothing(
    lab_env: LabEnv, tmp_path: Path
) -> None:
    env = lab_env
    env.cli("vm", "create", "c", "--host", "host-1", "--memory", "64M", "--disk", "16M")
    stale = tmp_path / "stale.json"
    plan_create(env, stale)
    before = vm_hosts(env)

    edited = tmp_path / "edited.json"
    doc = json.loads(stale.read_text())
    doc["steps"][0]["estimate_s"] += 1
    edited.write_text(json.dumps(doc, indent=2))
    line = env.cli.fails("plan", "apply", str(edited))
    assert "was edited" in line and "ferry plan create" in line
    assert vm_hosts(env) == before
    assert not edited.with_name("edited.json.state").exists()

    # A destination that lost the room for a VM between plan and apply. The VM runs,
    # so it runs on host-2 after its live migration and needs its memory there (an
    # off VM lands off and needs none). No disk, no kernel: SeaBIOS touches little
    # of its memory, and neither does the hog's.
    memory = env.cli.json("host", "show", "host-2")["memory"]
    env.cli("vm", "create", "huge", "--host", "host-1", "--memory", f"{memory * 4 // 10 // M}M",
            "--start")  # fmt: skip
    big = tmp_path / "big.json"
    huge = next(s for s in plan_create(env, big)["steps"] if s["vm"] == "huge")
    assert huge["option"] == "live-migration"
    assert huge["preconditions"]["destination_free_memory"] > 0
    env.cli("vm", "create", "hog", "--host", "host-2", "--memory", f"{memory * 7 // 10 // M}M",
            "--start")  # fmt: skip
    try:
        line = env.cli.fails("plan", "apply", str(big))
    finally:
        env.cli("vm", "delete", "hog", "--force")
    assert "host-2 lacks the capacity for VM huge" in line and "nothing was changed" in line
    assert not big.with_name("big.json.state").exists()
    assert vm_hosts(env)["huge"] == ("host-1", "running")
    env.cli("vm", "delete", "huge", "--force")

    env.cli("vm", "delete", "c")
    line = env.cli.fails("plan", "apply", str(stale))
    assert f"plan {stale} is stale" in line and "VM 'c' is gone" in line
    assert line.endswith(f"re-plan with ferry plan create --from host-1 --to host-2 -o {stale}")
    line = env.cli.fails("plan", "apply", str(stale), "--dry-run")
    assert "is stale" in line
    assert not stale.with_name("stale.json.state").exists()
    assert "c" not in vm_hosts(env)


@pytest.fixture
def slow_moves(lab_env: LabEnv) -> Iterator[LabEnv]:
    """Moves capped at 40 MiB/s (the agents restart with it, and again without): a
    256M test guest's memory copy then takes seconds, so apply's 0.5 s poll reports
    it. Uncapped it took 0.4 s at a load of ~10 and the poll missed it."""
    lab_env.lab.up(2, host_settings={"migration_max_bandwidth": 40 * M})
    try:
        yield lab_env
    finally:
        lab_env.lab.up(2, host_settings={"migration_max_bandwidth": UNCAPPED})


def test_plan_apply_moves_the_vms_resumes_after_kill_and_ctrl_c_and_twice_is_done(
    slow_moves: LabEnv, tmp_path: Path
) -> None:
    env = slow_moves
    for name in ("a", "b"):
        env.cli("vm", "create", name, "--host", "host-1", "--guest", "test", "--memory", "256M",
                "--disk", "32M", "--start")  # fmt: skip
    for name in ("a", "b"):
        env.wait_console(name, lambda t: len(seqs(t)) >= 2, timeout=180)
    plan = tmp_path / "plan.json"
    doc = plan_create(env, plan)
    steps = {s["vm"]: s for s in doc["steps"]}
    assert set(steps) == {"a", "b"}
    for step in steps.values():
        assert step["option"] == "live-migration"
        assert (step["source"], step["destination"]) == ("host-1", "host-2")
    first, second = sorted(steps.values(), key=lambda s: s["order"])
    key1, key2 = (f"{s['order']}:{s['vm']}" for s in (first, second))

    dry = env.cli("plan", "apply", str(plan), "--dry-run").stdout
    assert "apply would run" in dry and first["vm"] in dry and second["vm"] in dry
    assert not plan.with_name("plan.json.state").exists()

    # 1. Killed while the first step's move runs: the move goes on at the agent.
    code, _ = apply_until(env, plan, lambda e: e.get("event") == "progress"
                          and e["step"] == key1, signal.SIGKILL)  # fmt: skip
    assert code == -signal.SIGKILL
    record = state_of(plan)[key1]
    assert record["state"] == "running" and record["job_host"] == "host-1"
    job1 = record["job_id"]

    # 2. The next apply finds that job again by id, then is interrupted in step two
    # once its memory moves (a cancel while the destination prepares can race it).
    def late_in_step_two(event: dict[str, Any]) -> bool:
        return event.get("event") == "progress" and event["step"] == key2 and \
            event["phase"] in ("copying-memory", "switching-over")  # fmt: skip

    code, events = apply_until(env, plan, late_in_step_two, signal.SIGINT)
    assert code == 130
    ends = [e for e in events if e.get("event") == "step" and e["step"] == key1]
    assert ends[-1]["state"] == "done" and job1 in ends[-1]["why"]
    state = state_of(plan)
    assert state[key1]["state"] == "done" and state[key1]["job_id"] == job1
    assert state[key2]["state"] == "running"

    # 3. Resumed: step one stays done (its VM moved once), step two finishes.
    result = json.loads(env.cli("plan", "apply", str(plan), "--json").stdout.splitlines()[-1])
    assert result["result"] == "ok" and result["done"] == [key1, key2]
    # The cap held: ~100 MiB of guest memory at 40 MiB/s (uncapped: 0.4 s).
    assert result["steps"][1]["result"]["memory_copy_s"] > 1.5, result["steps"][1]
    assert [j["id"] for j in moves_of(env, first["vm"])] == [job1]
    hosts = vm_hosts(env)
    assert hosts["a"] == ("host-2", "running") and hosts["b"] == ("host-2", "running")
    for name in ("a", "b"):
        count = len(seqs(env.console(name)))
        env.wait_console(name, lambda t, n=count: len(seqs(t)) > n, timeout=120)

    # 4. Twice: everything is done, nothing runs.
    moves = len(env.cli.json("job", "list", "--host", "host-1"))
    out = env.cli("plan", "apply", str(plan)).stdout
    assert f"every step of plan {plan} is done already (2 steps)" in out
    assert len(env.cli.json("job", "list", "--host", "host-1")) == moves
    env.cli("vm", "kill", "a")
    env.cli("vm", "kill", "b")


def test_plan_apply_carries_on_across_a_restart_of_the_source_agent(
    lab_env: LabEnv, tmp_path: Path
) -> None:
    """The source agent dies in the middle of the move and comes back: the agent undoes
    the move (the VM stays on host-1), apply waits for it, runs the move once more and
    finishes, without being started again."""
    env = lab_env
    env.cli("vm", "create", "r", "--host", "host-1", "--guest", "test", "--memory", "256M",
            "--disk", "32M", "--start")  # fmt: skip
    env.wait_console("r", lambda t: len(seqs(t)) >= 2, timeout=180)
    plan = tmp_path / "r.json"
    doc = plan_create(env, plan)
    assert [s["vm"] for s in doc["steps"]] == ["r"]

    def restart_host_1() -> None:
        env.kill_agent(1)
        env.lab.up(2)

    def memory_moving(event: dict[str, Any]) -> bool:
        return event.get("event") == "progress" and event["phase"] == "copying-memory"

    code, events = apply_until(env, plan, memory_moving, restart_host_1)
    assert code == 0, events[-3:]
    assert events[-1]["result"] == "ok" and events[-1]["done"] == [f"{doc['steps'][0]['order']}:r"]
    moves = moves_of(env, "r")
    assert [m["state"] for m in moves] == ["failed", "done"], moves
    assert "agent restarted" in moves[0]["error"]
    assert events[-1]["steps"][0]["job_id"] == moves[1]["id"]
    assert vm_hosts(env)["r"] == ("host-2", "running")
    count = len(seqs(env.console("r")))
    env.wait_console("r", lambda t: len(seqs(t)) > count, timeout=120)
    env.cli("vm", "kill", "r")


def test_an_in_place_step_moves_a_running_vm_into_a_fresh_qemu_and_upgrades_an_off_one(
    lab_env: LabEnv, tmp_path: Path
) -> None:
    """``--from host-1 --to host-1`` plans ferry's in-place upgrade; apply runs it as the
    plan says: the running VM moves live into a new QEMU on host-1 (its records keep
    counting, no reboot), the off VM gets ``vm upgrade-version``. A resumed apply whose
    record says the refresh was asked for, and finds another pid, does not refresh again."""
    env = lab_env
    level = env.cli.json("host", "show", "host-1")["functional_level"]
    assert level == 3
    env.cli("vm", "create", "p", "--host", "host-1", "--guest", "test", "--memory", "128M",
            "--disk", "16M", "--config-version", "2", "--start")  # fmt: skip
    env.cli("vm", "create", "o", "--host", "host-1", "--memory", "64M", "--disk", "16M",
            "--config-version", "2")  # fmt: skip
    env.wait_console("p", lambda t: len(seqs(t)) >= 2, timeout=180)
    before = env.vm("p")
    assert before["pid"] and before["config_version"] == env.vm("o")["config_version"] == 2
    plan = tmp_path / "in-place.json"
    env.cli("plan", "create", "--from", "host-1", "--to", "host-1", "-o", str(plan))
    steps = {s["vm"]: s for s in json.loads(plan.read_text())["steps"]}
    assert set(steps) == {"p", "o"}
    for step in steps.values():
        assert step["option"] == "in-place-upgrade"
        assert (step["source"], step["destination"]) == ("host-1", "host-1")
    assert steps["p"]["improvement"] == "in-place upgrade with VMs running"
    assert steps["p"]["estimate_s"] > 0 and steps["o"]["estimate_s"] == 0
    keys = {name: f"{s['order']}:{name}" for name, s in steps.items()}

    result = json.loads(env.cli("plan", "apply", str(plan), "--json").stdout.splitlines()[-1])
    assert result["result"] == "ok", result
    assert sorted(result["done"]) == sorted(keys.values())
    after = env.vm("p")
    assert (after["host"], after["state"]) == ("host-1", "running")
    assert after["pid"] != before["pid"] and after["config_version"] == before["config_version"]
    record = state_of(plan)[keys["p"]]["result"]
    assert record["refreshed"] and (record["from_pid"], record["old_pid"], record["pid"]) == (
        before["pid"], before["pid"], after["pid"])  # fmt: skip
    # Version 2 -> 3 changes the machine type: not while it runs (the step says so).
    assert record["config_version"] == 2 and "needs a restart" in record["note"]
    assert ended(before["pid"]), f"the old QEMU {before['pid']} runs on"
    count = len(seqs(env.console("p")))
    text = env.wait_console("p", lambda t: len(seqs(t)) > count + 1, timeout=120)
    numbers = seqs(text)
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)  # no reboot
    upgraded = env.vm("o")
    assert (upgraded["state"], upgraded["config_version"]) == ("off", level)

    # Resumed where the record says the refresh was asked for and not that it ended:
    # the pid differs from the one recorded, so it is done without a second refresh.
    doc = json.loads(plan.with_name(plan.name + ".state").read_text())
    for step in doc["steps"]:
        if step["key"] == keys["p"]:
            step.update(state="running", phase="refresh", result={"from_pid": before["pid"]})
    plan.with_name(plan.name + ".state").write_text(json.dumps(doc))
    result = json.loads(env.cli("plan", "apply", str(plan), "--json").stdout.splitlines()[-1])
    assert result["result"] == "ok" and sorted(result["done"]) == sorted(keys.values())
    assert env.vm("p")["pid"] == after["pid"]
    out = env.cli("plan", "apply", str(plan)).stdout
    assert f"every step of plan {plan} is done already (2 steps)" in out
    assert env.vm("p")["pid"] == after["pid"]

    # ferry vm refresh does the same for one VM by hand.
    moved = env.cli.json("vm", "refresh", "p")
    assert moved["old_pid"] == after["pid"] and moved["pid"] == env.vm("p")["pid"] != after["pid"]
    line = env.cli.fails("vm", "refresh", "o")
    assert "cannot migrate VM 'o': it is off" in line
    env.cli("vm", "kill", "p")
    env.cli("vm", "delete", "p")
    env.cli("vm", "delete", "o")


def test_an_off_vm_is_exported_and_imported_with_export_dir(
    lab_env: LabEnv, tmp_path: Path
) -> None:
    """An off VM is planned as export/import (no memory asked of host-2); apply needs
    --export-dir, then the VM ends on host-2, off, with its UUID, gone from host-1;
    a second apply says every step is done."""
    env = lab_env
    env.cli("vm", "create", "cold", "--host", "host-1", "--memory", "64M", "--disk", "16M")
    uuid = env.vm("cold")["uuid"]
    plan = tmp_path / "cold.json"
    doc = plan_create(env, plan)
    assert [s["vm"] for s in doc["steps"]] == ["cold"]
    step = doc["steps"][0]
    assert step["option"] == "export-import" and step["destination"] == "host-2"
    assert step["preconditions"]["destination_free_memory"] == 0
    key = f"{step['order']}:cold"

    line = env.cli.fails("plan", "apply", str(plan))
    assert "pass --export-dir DIR" in line and "nothing was changed" in line
    assert vm_hosts(env)["cold"] == ("host-1", "off")
    assert not plan.with_name("cold.json.state").exists()

    exports = env.lab.images_dir / "plan-exports"
    exports.mkdir(exist_ok=True)
    out = env.cli("plan", "apply", str(plan), "--export-dir", str(exports), "--json").stdout
    result = json.loads(out.splitlines()[-1])
    assert result["result"] == "ok" and result["done"] == [key], result
    copies = [vm for vm in env.cli.json("vm", "list") if vm["uuid"] == uuid]
    assert [(vm["name"], vm["host"], vm["state"]) for vm in copies] == [
        ("cold", "host-2", "off")], copies  # fmt: skip
    assert all(vm["name"] != "cold" for vm in env.cli.json("vm", "list", "--host", "host-1"))
    assert state_of(plan)[key]["state"] == "done"

    out = env.cli("plan", "apply", str(plan), "--export-dir", str(exports)).stdout
    assert f"every step of plan {plan} is done already (1 steps)" in out
    assert env.vm("cold")["host"] == "host-2"
    env.cli("vm", "delete", "cold")
