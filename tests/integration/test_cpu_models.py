"""CPU models on real agents and QEMU: a named model boots under TCG and moves, and a
host that cannot run a VM's model refuses its move, replica, failovers and import,
changing nothing.

TCG runs every model it has all the features of; two ways make a host unable to
run one: QEMU's own ``unavailable-features`` under TCG (Haswell-v4 lacks pcid,
x2apic, tsc-deadline, invpcid and spec-ctrl here), and host.toml's
``cpu_models``, which the test sets on host-2.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import UP, LabEnv, lab_session, qemu_pids_for, seqs

pytestmark = pytest.mark.integration

NAMED = "Westmere-v1"
LACKING = "Haswell-v4"  # TCG lacks some of its features (QEMU 7.2 here)
LACKS = "pcid, x2apic, tsc-deadline, invpcid, spec-ctrl"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, guest_cache: Path) -> Iterator[LabEnv]:
    with lab_session(tmp_path_factory.mktemp("cpu")) as lab_env:
        lab_env.lab.up(2)
        yield lab_env


def cpu_arg(pid: int) -> str:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return argv[argv.index("-cpu") + 1]


def vm_dirs(env: LabEnv, index: int) -> set[str]:
    path = env.lab.host(index).data_dir / "vms"
    return {p.name for p in path.iterdir()} if path.exists() else set()


def names(env: LabEnv, host: str) -> set[str]:
    return {vm["name"] for vm in env.cli.json("vm", "list", "--host", host)}


def test_host_facts_list_the_models_and_what_tcg_lacks(env: LabEnv) -> None:
    facts = env.cli.json("host", "show", "host-1")
    assert facts["accelerator"] == "tcg"
    models = {m["name"]: m for m in facts["cpu_models"]}
    assert models[NAMED] == {"name": NAMED, "runnable": True, "unavailable_features": [],
                             "allowed": True}  # fmt: skip
    assert models["max"]["runnable"]
    assert not models[LACKING]["runnable"]
    assert ", ".join(models[LACKING]["unavailable_features"]) == LACKS
    assert models["host"]["unavailable_features"] == ["kvm"]
    text = env.cli("host", "show", "host-1").stdout
    assert f"cpu models: {sum(m['runnable'] for m in models.values())} of {len(models)}" in text


def test_bad_cpu_models_are_refused_and_nothing_is_made(env: LabEnv) -> None:
    before, dirs = names(env, "host-1"), vm_dirs(env, 1)
    create = ("vm", "create", "bad", "--host", "host-1", "--guest", "test", "--memory", "128M")
    line = env.cli.fails(*create, "--cpu-model", "Pentium-9000")
    assert "host 'host-1' has no CPU model 'Pentium-9000'" in line
    line = env.cli.fails(*create, "--cpu-model", LACKING)
    assert f"host 'host-1' cannot run CPU model '{LACKING}': it lacks features {LACKS}" in line
    line = env.cli.fails(*create, "--cpu-model", "max,+avx512f")
    assert "invalid CPU model 'max,+avx512f'" in line
    assert names(env, "host-1") == before and vm_dirs(env, 1) == dirs


def test_a_named_model_boots_under_tcg_and_moves_both_ways(env: LabEnv) -> None:
    cli = env.cli
    cli("vm", "create", "plain", "--host", "host-1", "--memory", "128M", "--disk", "16M")
    assert env.vm("plain")["cpu_model"] == "max"  # the TCG default: what boots here
    cli("vm", "delete", "plain")

    cli("vm", "create", "westy", "--host", "host-1", "--guest", "test", "--memory", "128M",
        "--disk", "32M", "--cpu-model", NAMED, "--start")  # fmt: skip
    vm = env.vm("westy")
    assert vm["cpu_model"] == NAMED and cpu_arg(vm["pid"]) == f"{NAMED},enforce"
    assert f"cpu model {NAMED}" in cli("vm", "show", "westy").stdout
    env.wait_console("westy", lambda t: len(seqs(t)) >= 2, timeout=180)
    for there in ("host-2", "host-1"):
        last_here = max(seqs(env.console("westy")))
        cli("vm", "move", "westy", "--to", there)
        moved = env.vm("westy")
        assert moved["host"] == there and moved["state"] == "running"
        assert moved["cpu_model"] == NAMED and cpu_arg(moved["pid"]) == f"{NAMED},enforce"
        assert qemu_pids_for(vm["uuid"]) == [moved["pid"]]
        # The guest counts on where it landed, with no new boot: the same CPU.
        text = env.wait_console("westy", lambda t: len(seqs(t)) >= 2, timeout=120)
        assert not UP.search(text) and seqs(text)[0] > last_here


@pytest.fixture(scope="module")
def restricted(env: LabEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabEnv]:
    """host-2 offers only "max" (host.toml cpu_models); each host may replicate to the
    other (a planned failover needs the way back)."""
    root = tmp_path_factory.mktemp("replicas")
    for me, other in (("host-1", "host-2"), ("host-2", "host-1")):
        env.cli("replica-server", "enable", "--host", me, "--storage", str(root / me),
                "--allow", other)  # fmt: skip
    env.restart_agent(2, cpu_models=["max"])
    yield env
    env.restart_agent(2, cpu_models=[])


def test_a_host_that_does_not_offer_the_model_refuses_move_and_failovers(
    restricted: LabEnv,
) -> None:
    env, cli = restricted, restricted.cli
    models = {m["name"]: m for m in cli.json("host", "show", "host-2")["cpu_models"]}
    assert models["max"]["runnable"] and models["max"]["allowed"]
    assert not models[NAMED]["runnable"] and not models[NAMED]["allowed"]
    assert "narrowed by host.toml" in cli("host", "show", "host-2").stdout

    vm = env.vm("westy")
    assert vm["host"] == "host-1" and vm["state"] == "running"
    jobs = {j["id"] for j in cli.json("job", "list", "--host", "host-1")}
    dirs = vm_dirs(env, 2)
    refusal = f"VM 'westy': host 'host-2' does not offer CPU model '{NAMED}'"
    line = cli.fails("vm", "move", "westy", "--to", "host-2")
    assert refusal in line and "cpu_models allows only max" in line
    # Refused before anything started: no job, nothing on host-2, the same QEMU.
    assert {j["id"] for j in cli.json("job", "list", "--host", "host-1")} == jobs
    assert "westy" not in names(env, "host-2") and vm_dirs(env, 2) == dirs
    after = env.vm("westy")
    assert after["host"] == "host-1" and after["state"] == "running"
    assert after["pid"] == vm["pid"] and qemu_pids_for(vm["uuid"]) == [vm["pid"]]

    # Nor may host-2 become a replica it could never fail over to.
    enable = ("replication", "enable", "westy", "--replica", "host-2", "--frequency", "30s")
    assert refusal in cli.fails(*enable)
    assert env.vm("westy")["replication"] is None and vm_dirs(env, 2) == dirs
    assert "westy" not in names(env, "host-2")

    # A replica made while host-2 still offered the model; then host-2 stops offering it.
    env.restart_agent(2, cpu_models=[])
    cli(*enable)
    env.restart_agent(2, cpu_models=["max"])
    try:
        assert env.vm("westy", "host-2")["state"] == "replica"
        replica_dirs = vm_dirs(env, 2)
        for args in (("failover", "test", "westy"), ("failover", "start", "westy"),
                     ("failover", "planned", "westy")):  # fmt: skip
            line = cli.fails(*args)
            assert refusal in line, (args, line)
        # Nothing changed: the VM runs on host-1 in the same QEMU, host-2 keeps the
        # replica (no test VM, no failover), and replication goes on.
        after = env.vm("westy")
        assert after["host"] == "host-1" and after["state"] == "running"
        assert after["pid"] == vm["pid"]
        assert env.vm("westy", "host-2")["state"] == "replica"
        assert "westy-test" not in names(env, "host-2") and vm_dirs(env, 2) == replica_dirs
        status = cli.json("replication", "status", "westy")
        assert status["state"] == "replicating", status
        synced = json.loads(cli("replication", "sync", "westy", "--json").stdout.splitlines()[-1])
        assert synced["result"] == "ok", synced
    finally:
        cli("replication", "remove", "westy", "--host", "host-1", check=False)
        cli("vm", "delete", "westy", "--force", "--host", "host-2", check=False)


def _resum(folder: Path, name: str) -> None:
    """Make the manifest agree with a file the test altered (an export made elsewhere)."""
    data = (folder / name).read_bytes()
    manifest: dict[str, Any] = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == name:
            entry["size"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_an_import_the_host_cannot_run_is_refused(restricted: LabEnv) -> None:
    env, cli = restricted, restricted.cli
    cli("vm", "create", "cold", "--host", "host-1", "--memory", "128M", "--disk", "16M",
        "--cpu-model", NAMED)  # fmt: skip
    folder = env.lab.images_dir / "cold-export"
    cli("vm", "export", "cold", "--to", str(folder))
    assert json.loads((folder / "vm.json").read_text())["cpu_model"] == NAMED

    # An export from a host whose CPU had Haswell's features (a KVM host, say).
    haswell = env.lab.images_dir / "cold-haswell"
    shutil.copytree(folder, haswell)
    config = json.loads((haswell / "vm.json").read_text())
    (haswell / "vm.json").write_text(json.dumps({**config, "cpu_model": LACKING}))
    _resum(haswell, "vm.json")

    cases = [
        (haswell, "host-1", f"host 'host-1' cannot run CPU model '{LACKING}': it lacks "
                            f"features {LACKS}"),
        (folder, "host-2", f"host 'host-2' does not offer CPU model '{NAMED}'"),
    ]  # fmt: skip
    for path, host, message in cases:
        before, dirs = names(env, host), vm_dirs(env, int(host[-1]))
        line = cli.fails("vm", "import", str(path), "--host", host, "--name", "cold-copy")
        assert message in line, (path, host, line)
        assert names(env, host) == before and vm_dirs(env, int(host[-1])) == dirs

    cli("vm", "import", str(folder), "--host", "host-1", "--name", "cold-copy", "--mode", "new-id")
    assert env.vm("cold-copy")["cpu_model"] == NAMED
    for name in ("cold", "cold-copy"):
        cli("vm", "delete", name, "--host", "host-1")
