"""Replication through a fault proxy, and damaged delta streams: nothing bad is ever linked.

host-1 replicates one test guest to host-2 with the fault proxy
(``ferry.testing.fault_proxy``) between the agents: the replication is
enabled while the admin's settings name the proxy as host-2's URL, so the
relationship's ``replica_url`` (every peer call of every cycle) goes through
it. Each run puts one fault in force (delay, drop for 3 s, a cut after N
bytes, one byte flipped at offset N of the stream to the replica), runs
``replication sync``, lifts the fault and syncs until a cycle succeeds
again. A byte flipped inside TLS is caught by TLS; the stream's own checks
(per-payload SHA-256, CRC'd frames, the trailer) are proved by the agent's
``corrupt_replication_streams`` hook, which damages one byte of the delta
stream itself before TLS: the replica must refuse it.

After every run: no ``*.partial`` left on the replica, its chain passes
``qemu-img check`` with the backing chain, the latest point's records have
no corrupt block and never go backwards; at the end the replica equals the
primary's disk byte for byte (guest paused). Counted: corrupted streams
sent (that the proxy or the hook actually damaged) and detected (refused,
nothing damaged linked).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.client.settings import load_settings, save_settings
from ferry.guest.records import read_records
from ferry.testing.fault_proxy import PASS, Fault, FaultProxy, fault_proxy
from tests.conftest import LabEnv, same_image
from tests.faults.conftest import LONG_TIMEOUT, Tally, boot_writing_guest, check_chain, runs

pytestmark = pytest.mark.integration

VM = "sfault"
KINDS = ["delay", "drop", "cut", "corrupt"]


@pytest.fixture(scope="module")
def storage(lab_env: LabEnv, tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("replicas")
    lab_env.cli("replica-server", "enable", "--host", "host-2", "--storage", str(where),
                "--allow", "host-1")  # fmt: skip
    return where


@pytest.fixture(scope="module")
def proxy(lab_env: LabEnv) -> Iterator[FaultProxy]:
    url = load_settings(lab_env.home).hosts["host-2"].url
    port = int(url.rsplit(":", 1)[1])
    with fault_proxy(("127.0.0.1", port)) as proxied:
        yield proxied


@pytest.fixture(scope="module")
def guest(lab_env: LabEnv, storage: Path, proxy: FaultProxy) -> Iterator[str]:
    cli = lab_env.cli
    boot_writing_guest(lab_env, VM)
    settings = load_settings(lab_env.home)
    direct = settings.hosts["host-2"].url
    settings.hosts["host-2"].url = f"https://{proxy.url_host}"
    save_settings(settings, lab_env.home)
    try:  # the replica URL the primary keeps is the proxy's
        cli("replication", "enable", VM, "--replica", "host-2", "--frequency", "5m")
    finally:
        settings.hosts["host-2"].url = direct
        save_settings(settings, lab_env.home)
    yield VM
    cli("replication", "remove", VM, "--host", "host-1", check=False)
    for host in ("host-1", "host-2"):
        cli("vm", "delete", VM, "--force", "--host", host, check=False)


def sync_ok(lab_env: LabEnv) -> bool:
    out = lab_env.cli("replication", "sync", VM, "--json", check=False).stdout.strip()
    return bool(out) and json.loads(out.splitlines()[-1]).get("result") == "ok"


def replica_state(lab_env: LabEnv, storage: Path, uuid: str, tally: Tally) -> tuple[int, int]:
    """(last seq, corrupt records) of the replica's latest point; checks the chain too."""
    assert not list((storage / uuid).glob("*.partial")), "a half-written point was left"
    check_chain(sorted((storage / uuid).glob("*.qcow2")), tally)
    found = read_records(Path(lab_env.vm(VM, "host-2")["disks"][0]["path"]))
    return found.last_seq, found.corrupt


def fault_for(kind: str, rng: random.Random) -> Fault:
    if kind == "delay":
        return Fault("delay", delay_s=0.2)
    if kind == "drop":
        return Fault("drop")
    if kind == "cut":
        return Fault("cut", after_bytes=rng.randrange(2_000, 200_000))
    return Fault("corrupt", after_bytes=rng.randrange(2_000, 60_000), count=0)


def recover(lab_env: LabEnv, tally: Tally, what: str) -> None:
    """The fault lifted, a cycle must succeed within a minute (else the run is stuck)."""
    deadline = time.monotonic() + 60
    while not sync_ok(lab_env):
        if time.monotonic() > deadline:
            tally.stuck_operations += 1
            tally.notes.append(f"{what}: no cycle succeeded within 60 s after the fault")
            return
        time.sleep(1)


@LONG_TIMEOUT
def test_proxy_faults_between_the_agents(lab_env: LabEnv, storage: Path, proxy: FaultProxy,
                                         guest: str, tally: Tally) -> None:  # fmt: skip
    rng = random.Random(14)
    uuid = lab_env.vm(VM)["uuid"]
    assert sync_ok(lab_env)
    seq, _ = replica_state(lab_env, storage, uuid, tally)
    for kind in [k for k in KINDS for _ in range(runs(1))]:
        proxy.cut()  # fresh connections, so each fault meets a stream from its start
        hit_before = proxy.corrupted
        proxy.set_fault(fault_for(kind, rng))
        lift = threading.Timer(3.0, proxy.set_fault, args=(PASS,)) if kind == "drop" else None
        if lift is not None:
            lift.start()
        ok = sync_ok(lab_env)
        if lift is not None:
            lift.join()
        proxy.set_fault(PASS)
        tally.ran(f"proxy-{kind}")
        recover(lab_env, tally, f"proxy-{kind}")
        new_seq, corrupt = replica_state(lab_env, storage, uuid, tally)
        if kind == "corrupt" and proxy.corrupted > hit_before:
            tally.corrupt_sent += 1
            tally.corrupt_detected += not ok and corrupt == 0
        assert corrupt == 0 and new_seq >= seq, (kind, new_seq, seq, corrupt)
        seq = new_seq
    assert tally.stuck_operations == 0 and tally.bad_chains == 0, tally.notes


@LONG_TIMEOUT
def test_damaged_delta_streams_are_refused(lab_env: LabEnv, storage: Path, guest: str,
                                           tally: Tally) -> None:  # fmt: skip
    count = runs(1)
    uuid = lab_env.vm(VM)["uuid"]
    lab_env.restart_agent(1, corrupt_replication_streams=count)
    try:
        for _ in range(count):
            time.sleep(1)  # a few more records, so the delta is not empty
            result = lab_env.cli("replication", "sync", VM, check=False)
            refused = result.returncode != 0 and (
                "damaged" in result.stderr or "checksum" in result.stderr)  # fmt: skip
            tally.ran("hook-corrupt")
            tally.corrupt_sent += 1
            _, corrupt = replica_state(lab_env, storage, uuid, tally)
            tally.corrupt_detected += refused and corrupt == 0
    finally:
        lab_env.restart_agent(1, corrupt_replication_streams=0)
    recover(lab_env, tally, "hook-corrupt")
    # Everything that was refused went again: the replica equals the disk.
    lab_env.cli("vm", "pause", VM, "--host", "host-1")
    try:
        assert sync_ok(lab_env)
        primary = Path(lab_env.vm(VM, "host-1")["disks"][0]["path"])
        replica = Path(lab_env.vm(VM, "host-2")["disks"][0]["path"])
        assert same_image(primary, replica)
        ours, theirs = read_records(replica), read_records(primary)
        tally.lost_records += max(0, theirs.last_seq - ours.last_seq)
        assert ours.corrupt == 0 and ours.last_seq == theirs.last_seq
    finally:
        lab_env.cli("vm", "resume", VM, "--host", "host-1")
    assert tally.corrupt_detected == tally.corrupt_sent, tally.notes
    assert tally.bad_chains == 0, tally.notes
