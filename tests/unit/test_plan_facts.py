"""The inventory put together from agents' answers: storage kinds, roles, optional fields."""

from __future__ import annotations

from typing import Any

from ferry.core.plan.agent_facts import (
    DirtyRateView,
    DiskUsage,
    HostInventory,
    ProbeView,
    VmInventory,
)
from ferry.core.plan.facts import assemble
from ferry.core.plan.plan_file import StorageKind

M = 1024**2


def _host(name: str, vms: list[VmInventory], **kw: Any) -> HostInventory:
    return HostInventory(name=name, url=f"https://127.0.0.1/{name}", functional_level=2,
                         memory=4096 * M, free_memory=3000 * M, cpus=2,
                         volumes={"shared": "/srv/shared"}, vms=vms, **kw)  # fmt: skip


def _view(name: str, disks: list[str], **kw: Any) -> dict[str, Any]:
    return {"name": name, "uuid": f"u-{name}", "state": "running", "memory": 256 * M,
            "cpus": 1, "config_version": 2,
            "disks": [{"path": p, "size": 64 * M, "format": "qcow2"} for p in disks],
            **kw}  # fmt: skip


def _usage(name: str, disks: list[tuple[str, str | None]], **kw: Any) -> VmInventory:
    return VmInventory(name=name, uuid=f"u-{name}", state="running", memory=256 * M, cpus=1,
                       config_version=2, disks=[DiskUsage(path=p, size=64 * M, format="qcow2",
                                                          allocation=8 * M, volume=v)
                                                for p, v in disks], **kw)  # fmt: skip


def test_assemble() -> None:
    local = _usage("local", [("/d/a", None)])
    shared = _usage("shared", [("/srv/shared/b", "shared")])
    clustered = _usage("csv", [("/srv/shared/c", "shared")], cluster="c1", priority="high")
    h1 = _host("host-1", [local, shared, clustered], cluster="c1")
    views = [
        _view("local", ["/d/a"], nics=[{"network": "lab", "mac": "m", "model": "virtio"}],
              cpu_model="max",
              replication={"role": "primary", "state": "ok", "primary": "host-1",
                           "replica": "host-2", "frequency_s": 300}),
        _view("shared", ["/srv/shared/b"]),
        _view("csv", ["/srv/shared/c"], cluster="c1"),
        _view("arriving", [], incoming=True),
    ]  # fmt: skip
    host_view = {"version": "0.1", "supported_config_versions": [1, 3],
                 "networks": [{"name": "lab", "exists": True}, {"name": "gone", "exists": False}],
                 "cpu_models": [{"name": "max", "runnable": True, "allowed": True},
                                {"name": "Haswell-v4", "runnable": False}]}  # fmt: skip
    rate = DirtyRateView(vm="local", state="running", dirty_rate_bps=3.0 * M,
                         nonzero_fraction=0.5)  # fmt: skip
    probe = ProbeView(src="host-1", dst="host-2", bytes=32 * M, seconds=0.5,
                      bandwidth_bps=64.0 * M)  # fmt: skip
    inv = assemble(taken="t", hosts={"host-1": (host_view, h1, views)}, rates={"u-local": rate},
                   probes=[probe], clusters=[])  # fmt: skip
    (host,) = inv.hosts
    assert host.networks == ["lab"] and host.cpu_models == ["max"]
    assert host.supported_config_versions == (1, 3) and host.cluster == "c1"
    vms = {v.name: v for v in inv.vms}
    assert set(vms) == {"local", "shared", "csv"}  # an arriving VM is its source's
    a = vms["local"]
    assert a.storage is StorageKind.LOCAL and a.disk_bytes == 8 * M
    assert a.networks == ["lab"] and a.cpu_model == "max"
    assert a.dirty_rate_bps == 3.0 * M and a.memory_used == 128 * M
    assert a.replication is not None and a.replication.role == "primary"
    assert a.replication.partners == ["host-2"]
    assert vms["shared"].storage is StorageKind.HOST_VOLUME and vms["shared"].volume == "shared"
    c = vms["csv"]
    assert c.storage is StorageKind.CLUSTER_VOLUME and c.priority == "high"
    assert c.dirty_rate_bps is None and c.dirty_rate_note == "not measured: the VM is running"
    assert inv.link("host-1", "host-2") is not None
    assert inv.link("host-1", "host-2").bandwidth_bps == 64.0 * M  # type: ignore[union-attr]


def test_an_old_agent_without_networks_or_models_is_unknown_not_empty() -> None:
    inv = assemble(taken="t", hosts={"host-1": ({}, _host("host-1", []), [])}, rates={},
                   probes=[], clusters=[])  # fmt: skip
    assert inv.hosts[0].networks is None and inv.hosts[0].cpu_models is None


def test_an_extended_replica_names_its_origin() -> None:
    view = _view("x", [], state="replica",
                 replication={"role": "replica", "primary": "host-2", "replica": "host-3",
                              "origin": "host-1"})  # fmt: skip
    inv = assemble(taken="t", hosts={"host-3": ({}, _host("host-3", []), [view])}, rates={},
                   probes=[], clusters=[])  # fmt: skip
    rep = inv.vms[0].replication
    assert rep is not None and rep.role == "extended"
    assert rep.partners == ["host-1", "host-2"] and inv.vms[0].is_replica
