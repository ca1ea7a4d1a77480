"""Live moves between two clusters, with real agents, a real etcd and real QEMU guests.

One lab for the module: four hosts, cluster ``c1`` of host-1 and host-2,
cluster ``c2`` of host-3 and host-4 (each with its own volume ``csv1``, so a
move copies the disks), lease TTL 4 s. In order: bad input changes nothing;
a move c1 -> c2 while the guest writes (the result says ``unprotected_s`` 0
and the one revision that released and took it), then the destination node
dies and c2 restarts the VM on its other node, which finds every record the
guest wrote; last, the source node dies in the middle of a move and c1
restarts the VM on its other node while c2 keeps nothing of it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import UP, LabEnv, lab_session, seqs

pytestmark = pytest.mark.integration

C1, C2 = ("host-1", "host-2"), ("host-3", "host-4")
TTL_S = 4
BOOT_S = 180  # a TCG boot, on a machine shared with other test runs


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, guest_cache: Path) -> Iterator[LabEnv]:
    with lab_session(tmp_path_factory.mktemp("lab")) as env:
        env.lab.up(4, clusters={"c1": list(C1), "c2": list(C2)}, lease_ttl_s=TTL_S,
                   host_settings={"image_locking": False})  # fmt: skip
        for cluster in ("c1", "c2"):
            wait_states(env, cluster, {"up"}, timeout=60)
        yield env


def states(env: LabEnv, cluster: str) -> dict[str, str]:
    return {n["name"]: n["state"] for n in env.cli.json("cluster", "show", cluster)["nodes"]}


def wait_states(env: LabEnv, cluster: str, wanted: set[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    while time.monotonic() < deadline:
        seen = states(env, cluster)
        view = env.cli.json("cluster", "show", cluster)
        if view.get("leader") and set(seen.values()) <= wanted:
            return
        time.sleep(0.3)
    raise AssertionError(f"cluster {cluster} never settled: {seen}")


def create(env: LabEnv, name: str, host: str, *, writing: bool = True) -> dict[str, Any]:
    env.cli("vm", "create", name, "--cluster", "c1", "--volume", "csv1", "--host", host,
            "--guest", "test", "--memory", "128M", "--disk", "32M", "--start")  # fmt: skip
    if writing:  # the guest booted and writes its records
        env.wait_console(name, lambda t: len(seqs(t)) >= 2, timeout=BOOT_S)
    return env.vm(name)


def running_on(env: LabEnv, name: str, hosts: tuple[str, ...], timeout: float) -> dict[str, Any]:
    """Poll ``hosts`` until one runs VM ``name`` with a live QEMU."""
    deadline = time.monotonic() + timeout
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        for host in hosts:
            result = env.cli("vm", "show", name, "--host", host, "--json", check=False)
            if result.returncode == 0:
                shown = json.loads(result.stdout)
                seen[host] = shown.get("state")
                if shown["state"] == "running" and shown.get("pid") and shown["host"] == host:
                    return dict(shown)
            else:
                seen[host] = result.stderr.strip()
        time.sleep(0.3)
    raise AssertionError(f"VM {name} never ran on {hosts}: {seen}")


def in_cluster(env: LabEnv, name: str, cluster: str) -> bool:
    """Whether a node of ``cluster`` knows VM ``name`` (its own, or from the store)."""
    for host in C1 if cluster == "c1" else C2:
        result = env.cli("vm", "show", name, "--host", host, "--json", check=False)
        if result.returncode == 0 and json.loads(result.stdout).get("cluster") == cluster:
            return True
    return False


def test_bad_input_changes_nothing(lab: LabEnv) -> None:
    vm = create(lab, "still", "host-1", writing=False)
    cases = {
        ("--to-cluster", "c9"): "unknown cluster 'c9'",
        ("--to-cluster", "c1"): "is in cluster 'c1' already",
        ("--to-cluster", "c2", "--volume", "nope"): "cluster 'c2' has no volume 'nope'",
        ("--to-cluster", "c2", "--to", "host-1"): "is not a node of the cluster",
        ("--volume", "csv1", "--to", "host-2"): "--volume goes with --to-cluster",
    }
    for args, words in cases.items():
        line = lab.cli.fails("vm", "move", "still", *args)
        assert words in line, (args, line)
    after = lab.vm("still")
    assert (after["host"], after["state"], after["pid"]) == ("host-1", "running", vm["pid"])
    assert not in_cluster(lab, "still", "c2")
    lab.cli("vm", "delete", "still", "--force")


def test_move_into_c2_then_c2_restarts_it_when_its_node_dies(lab: LabEnv) -> None:
    vm = create(lab, "crosser", "host-1")
    out = lab.cli("vm", "move", "crosser", "--to-cluster", "c2", "--to", "host-3", "--json")
    result = json.loads(out.stdout.strip().splitlines()[-1])  # after the progress lines
    assert result["host"] == "host-3" and result["cluster"] == "c2", result
    assert result["from_cluster"] == "c1" and result["storage"] == "copy", result
    assert result["unprotected_s"] == 0.0, result
    moved = lab.vm("crosser")
    assert moved["host"] == "host-3" and moved["cluster"] == "c2", moved
    assert moved["disks"][0]["path"].startswith(str(lab.lab.cluster_volume_dir("c2"))), moved
    assert in_cluster(lab, "crosser", "c2") and not in_cluster(lab, "crosser", "c1")
    # The guest runs on and writes after the move.
    text = lab.wait_console("crosser", lambda t: len(seqs(t)) >= 2, timeout=BOOT_S)
    events = lab.cli.json("cluster", "events", "c2")
    arrived = [e for e in events if e["kind"] == "vm-arrived-from-cluster"]
    assert arrived and f"revision {result['handover_revision']}" in arrived[-1]["reason"]
    # Node host-3 dies whole: c2 restarts the VM on host-4 from the copied disk.
    before = max(seqs(text))
    lab.lab.crash("host-3")
    again = running_on(lab, "crosser", ("host-4",), timeout=TTL_S + BOOT_S)
    boot = lab.wait_console("crosser", lambda t: bool(UP.search(t)) and len(seqs(t)) >= 2,
                            timeout=BOOT_S, host="host-4")  # fmt: skip
    (up,) = UP.findall(boot)
    assert int(up) >= before, (up, before)
    lab.cli("vm", "kill", "crosser", "--host", "host-4")
    records = lab.cli.json("guest", "records", again["disks"][0]["path"])
    assert records["corrupt"] == 0 and records["count"] == records["last_seq"], records
    assert records["last_seq"] >= before, (records, before, vm["uuid"])
    lab.lab.up(4)  # host-3's agent back
    wait_states(lab, "c2", {"up"}, timeout=60)
    lab.cli("vm", "delete", "crosser", "--force")


def move_job(env: LabEnv, host: str) -> dict[str, Any] | None:
    jobs = [j for j in env.cli.json("job", "list", "--host", host) if j["kind"] == "move"
            and j["state"] not in ("done", "failed", "cancelled")]  # fmt: skip
    return jobs[-1] if jobs else None


Moving = tuple[threading.Thread, dict[str, Any], dict[str, Any] | None]


def move_until(lab: LabEnv, args: tuple[str, ...], reached: Callable[[dict[str, Any]], bool],
               timeout: float) -> Moving:  # fmt: skip
    """Run the move ``args`` in a thread until host-1's move job is as ``reached`` says."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        outcome["r"] = lab.cli(*args, check=False)

    mover = threading.Thread(target=run, daemon=True)
    mover.start()
    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        job = move_job(lab, "host-1")
        if job is not None and reached(job):
            break
        time.sleep(0.2)
    return mover, outcome, job


def test_source_node_lost_mid_move_c1_restarts_it(lab: LabEnv) -> None:
    vm = create(lab, "stayer", "host-1")
    # A slow stream, so the move is still copying when host-1 dies.
    mover, outcome, job = move_until(
        lab, ("vm", "move", "stayer", "--to-cluster", "c2", "--max-bandwidth", "2M"),
        lambda j: j["state"] == "copying-memory", timeout=60)  # fmt: skip
    assert job is not None and job["state"] == "copying-memory", job
    lab.lab.crash("host-1")
    mover.join(60)
    assert outcome["r"].returncode != 0
    again = running_on(lab, "stayer", ("host-2",), timeout=TTL_S + BOOT_S)
    assert again["cluster"] == "c1" and again["uuid"] == vm["uuid"], again
    # c2 keeps nothing of it: the destination's incoming copy went with the stream.
    deadline = time.monotonic() + 90  # CI once needed more than 30 s
    while in_cluster(lab, "stayer", "c2") or any(
        lab.cli("vm", "show", "stayer", "--host", h, "--json", check=False).returncode == 0
        and lab.vm("stayer", h)["host"] == h for h in C2):  # fmt: skip
        assert time.monotonic() < deadline, "a node of c2 still has VM stayer"
        time.sleep(0.5)
    assert not list(lab.lab.cluster_volume_dir("c2").glob(f"{vm['uuid']}*"))
    lab.lab.up(4)
    wait_states(lab, "c1", {"up"}, timeout=60)


def lose_source_after_hand_over(lab: LabEnv, name: str, *, cluster: str, to: str,
                                move: tuple[str, ...]) -> None:  # fmt: skip
    """host-1 waits after the hand-over transaction (a test hook) and dies whole there:
    the store gives VM ``name`` to ``to``, whose incoming QEMU holds the complete
    stream, and nobody will ask ``to`` to resume it. Once host-1's lease is gone, ``to``
    takes the owner by compare-and-swap and resumes that very QEMU: the guest goes on
    without a reboot. host-1's agent, back, ends its move done and forgets its copy."""
    lab.restart_agent(1, hold_after_handover_s=20.0)
    wait_states(lab, "c1", {"up"}, timeout=60)
    try:
        create(lab, name, "host-1")
        mover, outcome, job = move_until(lab, ("vm", "move", name, *move, "--to", to),
                                         lambda j: bool(j.get("handover_revision")),
                                         timeout=120)  # fmt: skip
        assert job is not None and job.get("handover_revision"), job
        arriving = lab.vm(name, to)
        assert arriving["state"] != "running", arriving  # not resumed: host-1 holds
        lab.lab.crash("host-1")
        crashed_at = time.time()
        mover.join(90)
        assert outcome["r"].returncode != 0
        again = running_on(lab, name, (to,), timeout=TTL_S + 60)
        assert again["cluster"] == cluster, again
        if arriving.get("pid"):
            assert again["pid"] == arriving["pid"], (again, arriving)  # the same QEMU
        incoming = next(j for j in lab.cli.json("job", "list", "--host", to)
                        if j["id"] == job["id"])  # fmt: skip
        assert incoming["state"] == "done", incoming
        assert "host-1 was lost during the switch-over" in incoming["finished_without_source"]
        print(f"{name}: resumed on {to} {incoming['resumed_at'] - crashed_at:.1f} s after "
              f"host-1 was powered off (lease TTL {TTL_S} s)")  # fmt: skip
        kinds = [e["kind"] for e in lab.cli.json("cluster", "events", cluster)]
        assert "vm-resumed-without-source" in kinds, kinds
        # The guest goes on writing, with no new boot (its console here began at resume).
        text = lab.wait_console(name, lambda t: len(seqs(t)) >= 2, timeout=60, host=to)
        assert not UP.search(text), text[-500:]
    finally:
        lab.restart_agent(1, hold_after_handover_s=0.0)  # host-1's agent back
        wait_states(lab, "c1", {"up"}, timeout=60)
    # host-1's restart finds the hand-over in its job: done there, its copy forgotten.
    deadline = time.monotonic() + 60
    while True:
        ended = next(j for j in lab.cli.json("job", "list", "--host", "host-1")
                     if j["id"] == job["id"])  # fmt: skip
        if ended["state"] in ("done", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert ended["state"] == "done", ended
    assert name not in [v["name"] for v in lab.cli.json("vm", "list", "--host", "host-1")]
    lab.cli("vm", "kill", name, "--host", to)
    records = lab.cli.json("guest", "records", again["disks"][0]["path"])
    assert records["corrupt"] == 0 and records["count"] == records["last_seq"], records
    lab.cli("vm", "delete", name, "--force", "--host", to)


def test_source_node_lost_between_hand_over_and_resume_c2_resumes_it(lab: LabEnv) -> None:
    lose_source_after_hand_over(lab, "orphan", cluster="c2", to="host-3",
                                move=("--to-cluster", "c2"))  # fmt: skip


def test_source_node_lost_in_a_move_within_c1_the_destination_resumes_it(lab: LabEnv) -> None:
    lose_source_after_hand_over(lab, "orphan-1", cluster="c1", to="host-2", move=())
