"""A move called off while one of its calls is still being answered on the destination.

The HTTP server keeps running a handler whose caller went away, so the
source's abort can reach the destination while its prepare is still making
the VM's disks, or before that prepare was even read. Either way the
destination must end with no record, directory or job that still receives.
These drive host-2's peer server directly, as two overlapping requests would.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from ferry.core.migration import IncomingState, Phase, Storage
from ferry.core.spec import DiskSpec, VmSpec
from ferry.core.versions import MAX_CONFIG_VERSION
from ferry.host.jobs import Job
from ferry.host.migration import destination as destination_module
from ferry.testing.peers import host_cert
from tests.unit import test_move_phases as phases_tests
from tests.unit.test_move_phases import Lab, assert_back_on_source, ended, reached

JOB = "j-race"
UUID = "racer-uuid"


race_lab = phases_tests.lab  # the two in-memory hosts of the move-phase tests


def _prepare_body(disks: int) -> bytes:
    spec = VmSpec(uuid=UUID, name="racer", config_version=MAX_CONFIG_VERSION, memory=128 << 20,
                  disks=tuple(DiskSpec(path=f"/src/disk{i}.qcow2", size=1 << 20)
                              for i in range(disks)))  # fmt: skip
    request = {"job_id": JOB, "spec": spec.model_dump(mode="json"), "storage": "copy"}
    return json.dumps(request).encode()


async def _call(lab: Lab, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
    return await lab.two.server.dispatch(host_cert("host-1"), method, path, body=body)


def _assert_no_trace(lab: Lab) -> None:
    assert lab.two.vm(UUID) is None and lab.two.vm("racer") is None
    assert not lab.two.vms.vm_dir(UUID).exists()
    incoming = lab.two.jobs.find(JOB)
    assert incoming is None or incoming.state == IncomingState.ABORTED


def test_an_abort_during_prepare_waits_for_it_then_removes_the_vm(
    race_lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = asyncio.Event()
    creating = asyncio.Event()
    made: list[Path] = []

    async def slow_create(path: Path, size: int, *, qemu_img: str) -> None:
        creating.set()
        await gate.wait()  # qemu-img still running when the abort comes in
        path.write_bytes(b"qcow2")
        made.append(path)

    monkeypatch.setattr(destination_module.qemu_img, "create", slow_create)

    async def go() -> tuple[tuple[int, Any], tuple[int, Any]]:
        prepare = asyncio.create_task(
            _call(race_lab, "POST", "/v1/peer/migrations", _prepare_body(2))
        )
        await creating.wait()  # prepare has recorded the move and makes its disks
        abort = asyncio.create_task(_call(race_lab, "POST", f"/v1/peer/migrations/{JOB}/abort"))
        for _ in range(20):
            await asyncio.sleep(0)
        early.append(abort.done())
        gate.set()
        return await prepare, await abort

    early: list[bool] = []
    (prepared, _), (aborted, payload) = asyncio.run(go())
    assert aborted == 200 and payload["state"] == "aborted"
    _assert_no_trace(race_lab)  # before the fix: the VM stayed here, migrating
    assert prepared == 201
    assert len(made) == 2  # both disks were made, and are gone again with the VM
    assert early == [False]  # the abort waited for the prepare under way


def test_an_abort_before_the_prepare_arrives_refuses_that_prepare(race_lab: Lab) -> None:
    async def go() -> tuple[tuple[int, Any], tuple[int, Any]]:
        aborted = await _call(race_lab, "POST", f"/v1/peer/migrations/{JOB}/abort")
        prepared = await _call(race_lab, "POST", "/v1/peer/migrations", _prepare_body(1))
        return aborted, prepared

    (aborted, payload), (prepared, refusal) = asyncio.run(go())
    assert aborted == 200 and payload["state"] == "aborted"
    assert prepared >= 400
    assert refusal["error"]["message"] == f"move {JOB} was called off by its source"
    _assert_no_trace(race_lab)
    assert race_lab.two.jobs.find(JOB) is None


def test_an_abort_of_an_unknown_move_from_a_non_host_is_refused(race_lab: Lab) -> None:
    async def go() -> tuple[int, Any]:
        return await race_lab.two.server.dispatch(
            host_cert("admin", role=None), "POST", f"/v1/peer/migrations/{JOB}/abort"
        )

    status, _ = asyncio.run(go())
    assert status == 403
    prepared = asyncio.run(_call(race_lab, "POST", "/v1/peer/migrations", _prepare_body(1)))
    assert prepared[0] == 201  # a non-host cannot block a move in advance


def test_a_second_cancel_does_not_cut_the_first_ones_undo_short(race_lab: Lab) -> None:
    model = race_lab.boot()
    model.hold = True

    async def go() -> Job:
        job = race_lab.move(storage=Storage.COPY)
        await reached(job, Phase.COPYING_MEMORY)
        race_lab.one.migrations.cancel(job.id)
        for _ in range(3):  # Ctrl-C of 'vm move', then 'job cancel', while undo runs
            await asyncio.sleep(0)
            race_lab.one.migrations.cancel(job.id)
        with pytest.raises(asyncio.CancelledError):
            await ended(job)
        return job

    job = asyncio.run(go())
    assert job.state == Phase.CANCELLED
    assert_back_on_source(race_lab, job, model)
