"""ferry plan create|show on a real lab: the inventory measured (a dirty rate from the
VM's QEMU, the bandwidth over the agents' TLS channel, disk allocation, free memory),
a plan for the lab's VMs from host-1 to host-2, and the bad inputs that change nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.client.fleet import Fleet
from ferry.client.settings import load_settings
from ferry.guest.build import dirty_memory_param
from tests.conftest import LabEnv

pytestmark = pytest.mark.integration

M = 1024**2


@pytest.fixture(scope="module")
def lab_vms(lab_env: LabEnv) -> Iterator[LabEnv]:
    """'busy' runs on host-1 rewriting 32 MiB of its memory every 4 s or so; 'quiet' is
    off on host-1. At most 32 MiB in a 2 s reading, so the plan's live migration of busy
    converges on the lab's link (46-74 MiB/s measured): as fast as TCG could, it did not
    always (the plan then chose export-import)."""
    cli = lab_env.cli
    cli("vm", "create", "busy", "--host", "host-1", "--guest", "test", "--memory", "384M",
        "--disk", "32M", "--append", dirty_memory_param(32 * M, pause_s=4),
        "--start")  # fmt: skip
    cli("vm", "create", "quiet", "--host", "host-1", "--guest", "test", "--memory", "128M",
        "--disk", "16M")  # fmt: skip
    lab_env.wait_console("busy", lambda t: "seq 3\n" in t, timeout=240)
    yield lab_env
    for name in ("busy", "quiet"):
        cli("vm", "delete", name, "--force", check=False)


def _dirty_rates(host: str, vm: str, *, tries: int) -> list[float]:
    """Ask the agent for ``vm``'s dirty rate until one is above zero (at most ``tries``)."""

    async def ask() -> list[float]:
        seen: list[float] = []
        async with Fleet(load_settings()) as fleet:
            for _ in range(tries):
                view = await fleet.client(host).get(f"/v1/vms/{vm}/dirty-rate", seconds="2")
                assert view["calc_time_s"] == 2 and 1.5 < view["took_s"] < 10
                seen.append(float(view["dirty_rate_bps"]))
                if seen[-1] > 0:
                    break
        return seen

    return asyncio.run(ask())


def _step(plan: dict[str, Any], vm: str) -> dict[str, Any]:
    return next(s for s in plan["steps"] if s["vm"] == vm)


def test_plan_from_host_1_to_host_2(lab_vms: LabEnv, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    plan = lab_vms.cli.json("plan", "create", "--from", "host-1", "--to", "host-2",
                            "-o", str(out))  # fmt: skip
    inv = plan["inventory"]
    (link,) = inv["links"]
    assert (link["src"], link["dst"], link["probe_bytes"]) == ("host-1", "host-2", 32 * M)
    assert link["bandwidth_bps"] > 1 * M and 0 < link["probe_s"] < 30
    hosts = {h["name"]: h for h in inv["hosts"]}
    assert set(hosts) == {"host-1", "host-2"}
    assert all(h["free_memory"] > 0 and h["functional_level"] >= 1 for h in hosts.values())
    assert hosts["host-1"]["free_memory"] <= hosts["host-1"]["memory"] - 384 * M
    vms = {v["name"]: v for v in inv["vms"]}
    busy, quiet = vms["busy"], vms["quiet"]
    # measured by busy's QEMU (calc-dirty-rate over 2 s); the guest rewrites its 32 MiB
    # in bursts (a shell loop, then 4 s asleep), so one window may see none: a few more
    # must see some
    assert busy["dirty_rate_bps"] is not None and busy["dirty_rate_bps"] >= 0
    rates = _dirty_rates("host-1", "busy", tries=6)
    # one pass of 32 MiB (and the guest's records) at most in a window: the pause holds
    assert 0 < max(rates) < 24 * M, rates
    assert quiet["dirty_rate_bps"] is None and "off" in quiet["dirty_rate_note"]
    # sampled from its QEMU's memory: its kernel, initramfs and what it rewrites are not
    # zero (the 32 MiB fill as the guest's loop reaches them), most of the rest is
    assert 16 * M < busy["memory_used"] < 384 * M and quiet["memory_used"] is None
    assert busy["memory"] == 384 * M and busy["storage"] == "local"
    (disk,) = busy["disks"]
    assert disk["size"] == 32 * M and 0 < disk["allocation"] <= 33 * M
    assert busy["networks"] == [] and busy["replication"] is None

    move = _step(plan, "busy")
    assert (move["option"], move["storage"], move["source"], move["destination"]) == (
        "live-migration",
        "copy",
        "host-1",
        "host-2",
    )
    assert move["reason"].startswith("standalone host: live migration yes")
    assert move["estimate_s"] > move["downtime_s"] > 0
    assert move["preconditions"]["must_be_running"] is True
    assert move["preconditions"]["destination_free_memory"] == 384 * M
    cold = _step(plan, "quiet")
    assert cold["option"] == "export-import" and cold["downtime_s"] == 0
    assert sorted(s["order"] for s in plan["steps"]) == [1, 2]

    # the file holds the same plan, sealed; show reads it back
    written = json.loads(out.read_text())
    assert written["digest"].startswith("sha256:") and written["steps"] == plan["steps"]
    shown = lab_vms.cli.json("plan", "show", str(out))
    assert shown["steps"] == plan["steps"]
    table = lab_vms.cli("plan", "show", str(out)).stdout
    assert "live-migration" in table and "export-import" in table
    assert "link host-1 -> host-2" in table
    # planning changed nothing
    assert lab_vms.vm("busy")["host"] == "host-1" and lab_vms.vm("busy")["state"] == "running"


def test_plan_table_and_policy(lab_vms: LabEnv, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('window = "22:00-22:01"\n[[vm]]\nmatch = "qu*"\nmust-run = true\n')
    text = lab_vms.cli("plan", "create", "--from", "host-1", "--to", "host-2",
                       "--policy", str(policy), "--probe-size", "8M").stdout  # fmt: skip
    assert "OPTION" in text and "DOWNTIME" in text and "busy" in text
    assert "standalone host: live migration yes" in text
    # quiet is off: nothing keeps it running, so the plan warns, in one line
    assert "VM 'quiet': no option meets its needs" in text


def test_bad_inputs_are_one_line_and_change_nothing(lab_vms: LabEnv, tmp_path: Path) -> None:
    cli = lab_vms.cli
    out = tmp_path / "never.json"
    line = cli.fails("plan", "create", "--from", "host-9", "--to", "host-2", "-o", str(out))
    assert "unknown host 'host-9' in --from" in line
    line = cli.fails("plan", "create", "--from", "host-1", "--to", "cluster:nope", "-o",
                     str(out))  # fmt: skip
    assert "unknown cluster 'nope' in --to" in line
    policy = tmp_path / "bad.toml"
    policy.write_text('[[vm]]\nmatch = "busy"\nmax_downtime = "1s"\n')
    line = cli.fails("plan", "create", "--from", "host-1", "--to", "host-2", "--policy",
                     str(policy), "-o", str(out))  # fmt: skip
    assert "unknown key 'max_downtime'" in line and "known: match, tag, must-run" in line
    assert not out.exists()
    good = tmp_path / "good.json"
    cli("plan", "create", "--from", "host-1", "--to", "host-2", "-o", str(good), "--probe-size",
        "4M")  # fmt: skip
    edited = json.loads(good.read_text())
    edited["steps"][0]["destination"] = "host-1"
    good.write_text(json.dumps(edited))
    line = cli.fails("plan", "show", str(good))
    assert "was edited after ferry plan create wrote it" in line
    assert lab_vms.vm("busy")["host"] == "host-1"
    assert cli.json("vm", "list", "--host", "host-2") == []

    # A destination without the room: a VM that takes all but 128M of host-2's memory
    # (no disk, no kernel: SeaBIOS touches little of it); busy needs 384M there.
    memory = cli.json("host", "show", "host-2")["memory"]
    cli("vm", "create", "hog", "--host", "host-2", "--memory", f"{memory // M - 128}M",
        "--start")  # fmt: skip
    try:
        line = cli.fails("plan", "create", "--from", "host-1", "--to", "host-2", "-o",
                         str(out), "--probe-size", "4M")  # fmt: skip
    finally:
        cli("vm", "delete", "hog", "--force")
    assert "destination lacks capacity: VM 'busy' needs 384M of memory and host-2 has" in line
    assert not out.exists() and lab_vms.vm("busy")["host"] == "host-1"


def test_replication_roles_and_partners(lab_vms: LabEnv, tmp_path: Path) -> None:
    """Last in the module: it leaves busy replicated to host-2."""
    cli = lab_vms.cli
    cli("replica-server", "enable", "--host", "host-2", "--storage", str(tmp_path / "replicas"),
        "--allow", "host-1")  # fmt: skip
    cli("replication", "enable", "busy", "--replica", "host-2", "--json")
    plan = cli.json("plan", "create", "--from", "host-1", "--to", "host-2", "--probe-size", "4M")
    copies = [v for v in plan["inventory"]["vms"] if v["name"] == "busy"]
    roles = {v["host"]: v["replication"] for v in copies}
    assert roles["host-1"]["role"] == "primary" and roles["host-1"]["partners"] == ["host-2"]
    assert roles["host-2"]["role"] == "replica" and roles["host-2"]["partners"] == ["host-1"]
    # busy's only destination holds its replica: planned, with a warning that says so
    move = _step(plan, "busy")
    assert any("holds a copy of VM 'busy' already" in w for w in move["warnings"])
    cli("replication", "remove", "busy")
