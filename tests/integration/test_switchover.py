"""The pause a move's guest lives through, for real: honest downtime, convergence, post-copy."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ferry.guest.build import dirty_memory_param
from tests.conftest import UP, LabEnv, seqs

pytestmark = pytest.mark.integration

MiB = 1024**2


def boot(env: LabEnv, name: str, *extra: str) -> None:
    env.cli("vm", "create", name, "--host", "host-1", "--guest", "test", "--memory", "128M",
            "--disk", "32M", "--volume", "shared", "--start", *extra)  # fmt: skip
    env.wait_console(name, lambda t: len(seqs(t)) >= 2)


def move(env: LabEnv, name: str, *args: str) -> dict[str, Any]:
    lines = env.cli("vm", "move", name, "--to", "host-2", "--json", *args).stdout
    result: dict[str, Any] = json.loads(lines.strip().splitlines()[-1])
    return result


def still_counting(env: LabEnv, name: str) -> None:
    """The same guest run goes on counting on host-2 (no reboot)."""
    assert env.vm(name)["host"] == "host-2"
    text = env.wait_console(name, lambda t: len(seqs(t)) >= 2)
    assert not UP.search(text)


def test_a_move_reports_the_pause_from_stop_to_resume(lab_env: LabEnv) -> None:
    boot(lab_env, "pauser")
    result = move(lab_env, "pauser")
    assert result["result"] == "ok"
    # From the source QEMU's STOP event to the destination QEMU's RESUME event,
    # the agents' clocks lined up over their TLS channel (one machine: ~0).
    assert result["downtime_source"] == "qemu-events", result
    assert result["downtime_ms"] > 0
    assert abs(result["clock_offset_ms"]) < 50 and result["clock_error_ms"] < 50
    # QEMU's own figure leaves out the pause around it, so it is the smaller one
    # (a few ms of slack: QEMU counts from its own clock reads).
    assert result["qemu_downtime_ms"] <= result["downtime_ms"] + 5, result
    phases = result["pause_phases_ms"]
    assert list(phases) == ["stopped->continued", "continued->completed",
                            "completed->loaded", "loaded->resumed"]  # fmt: skip
    # The phases tile the pause: their sum is STOP -> RESUME.
    assert abs(sum(phases.values()) - result["downtime_ms"]) <= 2 + len(phases), result
    assert result["memory_bytes"] > 0 and result["disk_bytes"] == 0
    assert result["postcopy"] is False
    still_counting(lab_env, "pauser")
    lab_env.cli("vm", "delete", "pauser", "--force")


def test_a_guest_dirtying_memory_faster_than_the_link_moves_with_postcopy(
    lab_env: LabEnv,
) -> None:
    # 32 MiB rewritten in a loop against a 4 MiB/s cap: pre-copy alone never
    # gets under the downtime limit; post-copy switches after the first pass.
    boot(lab_env, "racer", "--append", dirty_memory_param(32 * MiB))
    result = move(lab_env, "racer", "--postcopy", "--max-bandwidth", "4M")
    assert result["result"] == "ok"
    # the destination resumed in postcopy-active (or QEMU sent pages after the switch)
    assert result["postcopy"] is True, json.dumps(result)
    assert result["downtime_source"] == "qemu-events" and result["downtime_ms"] > 0
    still_counting(lab_env, "racer")
    lab_env.cli("vm", "delete", "racer", "--force")


def test_postcopy_risk_is_in_the_help(lab_env: LabEnv) -> None:
    text = lab_env.cli("vm", "move", "--help").stdout
    assert "--postcopy" in text and "lost" in text
