"""The CPU refusal where it is used, without QEMU: failovers on the in-memory peer
network (ferry.testing.failover), the web console's destination picker, and
``vm create``'s default model on a KVM host.

host-2 cannot run the VM's model (its facts lack a feature of it); every
failover is refused before anything changes, on the host that decides.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.core.cpu_models import CpuFacts, parse_definitions
from ferry.core.vmstate import VmState
from ferry.host import jobs as jobs_module
from ferry.host.jobs import Job
from ferry.testing.failover import FailoverHost, failover_host, replicate
from ferry.testing.peers import MemoryNetwork
from ferry.web.operations import HostRow
from ferry.web.targets import move_targets
from tests.unit.web_fake import host_facts, vm_view

MODEL = "Haswell-v4"
DEFINITIONS: list[dict[str, object]] = [
    {"name": "max", "unavailable-features": []},
    {"name": MODEL, "unavailable-features": ["pcid", "x2apic"]},
]
REFUSAL = f"VM 'web': host 'host-2' cannot run CPU model '{MODEL}': it lacks features pcid, x2apic"


@pytest.fixture
def hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FailoverHost, ...]]:
    monkeypatch.setattr(jobs_module, "PERSIST_EVERY_S", 0.0)
    network = MemoryNetwork()
    one = failover_host(network, tmp_path, "host-1")
    two = failover_host(network, tmp_path, "host-2")
    replicate(network, one, two, points=2)
    for host in (one, two):  # the VM runs MODEL, on both sides of the relationship
        record = host.vm("web")
        assert record is not None
        host.catalog.update_spec(record.spec.model_copy(update={"cpu_model": MODEL}))
    two.vms.cpu = CpuFacts(host="host-2", models=parse_definitions(DEFINITIONS))
    yield one, two
    one.catalog.close()
    two.catalog.close()


def run(host: FailoverHost, action: str) -> Job:
    async def go() -> Job:
        f = host.failover
        if action == "planned":
            job = f.start_planned("web")
        elif action == "test":
            job = f.run_job("test", "web", lambda j: f.test("web", None, j))
        else:
            job = f.run_job("start", "web", lambda j: f.start("web", None, force=True, job=j))
        assert job.task is not None
        await job.task
        return job

    return asyncio.run(go())


@pytest.mark.parametrize("action", ["test", "start"])
def test_a_failover_on_the_replica_host_is_refused_first(
    hosts: tuple[FailoverHost, ...], action: str
) -> None:
    _, two = hosts
    rel = two.rel("web-0000-uuid")
    job = run(two, action)
    assert job.state == "failed" and job.detail["error"] == REFUSAL
    assert job.history == [("running", "starting"), ("failed", "failed")]
    assert two.rel("web-0000-uuid") == rel  # no failover state written
    assert two.vm("web-test") is None and two.vms.calls == []
    record = two.vm("web")
    assert record is not None and record.state is VmState.REPLICA


def test_a_planned_failover_is_refused_on_the_primary_before_it_stops_the_vm(
    hosts: tuple[FailoverHost, ...],
) -> None:
    one, two = hosts
    job = run(one, "planned")
    assert job.state == "failed" and REFUSAL in job.detail["error"]
    assert one.vms.calls == [] and two.vms.calls == []  # nothing stopped, nothing started
    record = one.vm("web")
    assert record is not None and record.state is VmState.RUNNING


def test_a_model_the_replica_runs_fails_over(hosts: tuple[FailoverHost, ...]) -> None:
    _, two = hosts
    two.vms.cpu = CpuFacts(host="host-2", models=parse_definitions(
        [{"name": MODEL, "unavailable-features": []}]))  # fmt: skip
    job = run(two, "test")
    assert job.state == "done", job.detail
    assert ("start", "web-test") in two.vms.calls


def test_the_destination_picker_names_the_missing_features() -> None:
    vm = vm_view("g1", "host-1", config_version=3, cpu_model=MODEL)
    models = [m.model_dump() for m in parse_definitions(DEFINITIONS)]
    runs = [m.model_dump() for m in parse_definitions([{"name": MODEL}])]
    hosts = [
        HostRow("host-2", "u", host_facts("host-2", 3, cpu_models=models)),
        HostRow("host-3", "u", host_facts("host-3", 3, cpu_models=runs)),
        HostRow("host-4", "u", host_facts("host-4", 3)),  # reports no models: not judged
    ]
    found = {t.host: (t.ok, t.reason) for t in move_targets(vm, hosts)}
    assert found == {
        "host-2": (False, f"host 'host-2' cannot run CPU model '{MODEL}': it lacks features "
                          "pcid, x2apic"),
        "host-3": (True, "functional level 3, tcg"),
        "host-4": (True, "functional level 3, tcg"),
    }  # fmt: skip


# Westmere-v1 under this machine's nested KVM (measured with query-cpu-definitions).
NESTED_KVM = [{"name": "Westmere-v1", "unavailable-features": [
    "pni", "pclmulqdq", "ssse3", "sse4.1", "sse4.2", "popcnt", "aes"]},
    {"name": "pentium3-v1", "unavailable-features": []}]  # fmt: skip


def test_vm_create_on_kvm_defaults_to_westmere_and_refuses_it_where_it_cannot_run(
    tmp_path: Path,
) -> None:
    from ferry.adapters.catalog import Catalog
    from ferry.errors import InvalidInputError
    from ferry.host.config import HostConfig
    from ferry.host.vms.requests import NewVm
    from ferry.host.vms.service import VmService

    config = HostConfig(name="kvm-1", data_dir=tmp_path / "data", tls_dir=tmp_path / "tls",
                        run_dir=tmp_path / "run")  # fmt: skip
    config.data_dir.mkdir()
    catalog = Catalog(config.data_dir)
    vms = VmService(config, catalog, accelerator="kvm", host_memory=1 << 32, host_cpus=2,
                    cpu=CpuFacts(host="kvm-1", models=parse_definitions(NESTED_KVM)))  # fmt: skip
    try:
        with pytest.raises(InvalidInputError) as refused:
            asyncio.run(vms.create(NewVm(name="web")))
        assert str(refused.value) == (
            "host 'kvm-1' cannot run CPU model 'Westmere-v1': it lacks features pni, "
            "pclmulqdq, ssse3, sse4.1, sse4.2, popcnt, aes; choose one it runs with --cpu-model"
        )
        assert catalog.find("web") is None and not any((config.data_dir / "vms").iterdir())
        record = asyncio.run(vms.create(NewVm(name="web", cpu_model="pentium3-v1")))
        assert record.spec.cpu_model == "pentium3-v1"
    finally:
        catalog.close()
