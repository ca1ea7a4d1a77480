"""Plan apply's runner against a fake fleet: a failure stops it with a report."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ferry.client.plan_apply import PlanApply, state_path
from ferry.core.plan import apply_state as st
from ferry.core.plan.plan_file import (
    HostFacts,
    Inventory,
    Option,
    Plan,
    Preconditions,
    Step,
    VmFacts,
    dumps,
)

M = 1024**2
VMS = ("a", "b", "c")


class FakeAgent:
    """One host's agent as the runner calls it: VMs, host facts, move jobs."""

    def __init__(self, fleet: FakeFleet, name: str) -> None:
        self.fleet, self.name = fleet, name

    async def get(self, path: str, **params: str) -> Any:
        if path == "/v1/host":
            return {"memory": 8192 * M, "free_memory": 4096 * M, "functional_level": 3,
                    "supported_config_versions": [1, 3]}  # fmt: skip
        if path == "/v1/vms":
            return [{"name": vm, "uuid": f"u-{vm}", "state": "running", "memory": 256 * M,
                     "config_version": 2, "disks": []}
                    for vm, host in self.fleet.where.items() if host == self.name]  # fmt: skip
        if path.startswith("/v1/jobs/"):
            return self.fleet.jobs[path.removeprefix("/v1/jobs/")]
        raise AssertionError(f"unexpected GET {path}")

    async def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        vm = path.split("/")[3]
        assert path == f"/v1/vms/{vm}/move", path
        self.fleet.moves.append((vm, dict(body or {})))
        job = {"id": f"job-{vm}", "state": "done", "error": None, "result": {}}
        if vm == "b":  # its move fails: the VM stays on its source
            job.update(state="failed", error="the destination refused the move")
        else:
            self.fleet.where[vm] = "host-2"
        self.fleet.jobs[job["id"]] = job
        return {**job, "state": "starting"}


class FakeFleet:
    def __init__(self) -> None:
        self.where = dict.fromkeys(VMS, "host-1")
        self.jobs: dict[str, dict[str, Any]] = {}
        self.moves: list[tuple[str, dict[str, Any]]] = []
        urls = {h: SimpleNamespace(url=f"https://127.0.0.1:{port}")
                for h, port in (("host-1", 7001), ("host-2", 7002))}  # fmt: skip
        self.settings = SimpleNamespace(hosts=urls, host=urls.__getitem__)
        self._agents = {h: FakeAgent(self, h) for h in urls}

    def client(self, host: str) -> FakeAgent:
        return self._agents[host]


class Watcher:
    def __init__(self) -> None:
        self.ended: list[tuple[str, str]] = []

    def started(self, steps: list[st.StepPlan], done: int) -> None:
        pass

    def step_started(self, step: st.StepPlan, what: str) -> None:
        pass

    def job(self, step: st.StepPlan, job: dict[str, Any]) -> None:
        pass

    def step_ended(self, step: st.StepPlan, record: st.StepRecord, why: str) -> None:
        self.ended.append((step.key, record.state.value))


def write_plan(path: Path) -> None:
    vms = [VmFacts(name=vm, uuid=f"u-{vm}", host="host-1", state="running", memory=256 * M,
                   config_version=2) for vm in VMS]  # fmt: skip
    hosts = [HostFacts(name=h, url=f"https://127.0.0.1:{p}", functional_level=3,
                       memory=8192 * M, free_memory=4096 * M)
             for h, p in (("host-1", 7001), ("host-2", 7002))]  # fmt: skip
    steps = [Step(order=i, vm=vm, option=Option.LIVE_MIGRATION, reason="r", estimate_s=1,
                  downtime_s=0.1, source="host-1", destination="host-2", storage="copy",
                  downtime_limit_ms=500 if vm == "a" else None,
                  preconditions=Preconditions(vm_uuid=f"u-{vm}", vm_host="host-1",
                                              config_version=2, state="running",
                                              must_be_running=True,
                                              destination_free_memory=256 * M))
             for i, vm in enumerate(VMS, 1)]  # fmt: skip
    plan = Plan(created="2026-12-02T03:00:00Z", sources=["host-1"], destinations=["host-2"],
                inventory=Inventory(taken="then", hosts=hosts, vms=vms), steps=steps)  # fmt: skip
    path.write_text(dumps(plan))


def test_apply_stops_at_the_first_failure_with_done_failed_and_left(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    write_plan(path)
    fleet, watcher = FakeFleet(), Watcher()
    runner = PlanApply(fleet, path, watcher)  # type: ignore[arg-type]
    report = asyncio.run(runner.run())

    doc = report.to_json()
    assert (doc["result"], doc["done"], doc["failed"], doc["left"]) == (
        "failed", ["1:a"], ["2:b"], ["3:c"])  # fmt: skip
    assert report.failure is not None and report.failure.startswith("step 2:b (b) failed: ")
    assert "the destination refused the move" in report.failure
    assert [vm for vm, _ in fleet.moves] == ["a", "b"]  # step 3 never started
    assert fleet.where == {"a": "host-2", "b": "host-1", "c": "host-1"}
    assert watcher.ended == [("1:a", "done"), ("2:b", "failed")]
    # The policy's downtime limit went with step 1's move; step 2 had none.
    assert fleet.moves[0][1] == {"to": "host-2", "to_url": "https://127.0.0.1:7002",
                                 "storage": "copy", "downtime_limit_ms": 500}  # fmt: skip
    assert "downtime_limit_ms" not in fleet.moves[1][1]
    # The state file holds what the report says, for the next apply.
    saved = json.loads(state_path(path).read_text())
    states = {s["key"]: (s["state"], s["job_id"]) for s in saved["steps"]}
    assert states == {"1:a": ("done", "job-a"), "2:b": ("failed", "job-b"),
                      "3:c": ("pending", None)}  # fmt: skip
    assert "the destination refused the move" in saved["steps"][1]["error"]
