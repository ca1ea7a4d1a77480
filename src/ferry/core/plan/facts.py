"""The planner's inventory, put together from what the agents answered.

Pure: the client (:mod:`ferry.client.inventory`) asks each host for
``GET /v1/host``, ``GET /v1/host/inventory`` and ``GET /v1/vms``, each
running VM for its dirty rate and each host pair for a bandwidth probe; this
module turns those answers into one :class:`~ferry.core.plan.plan_file.Inventory`.
Fields other features add to the host and VM views (networks, CPU models)
are read when present and left unknown (None) when not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ferry.core.plan.agent_facts import DirtyRateView, HostInventory, ProbeView
from ferry.core.plan.calibrate import samples_of
from ferry.core.plan.plan_file import (
    ClusterFacts,
    DiskFacts,
    HostFacts,
    Inventory,
    LinkFacts,
    ReplicationFacts,
    StorageKind,
    VmFacts,
)


def host_facts(view: Mapping[str, Any], inventory: HostInventory) -> HostFacts:
    """One host from its ``GET /v1/host`` view and its inventory."""
    networks = view.get("networks")
    models = view.get("cpu_models")
    low, high = view.get("supported_config_versions") or (1, 1)
    return HostFacts(
        name=inventory.name, url=inventory.url, version=str(view.get("version", "")),
        functional_level=inventory.functional_level, supported_config_versions=(low, high),
        memory=inventory.memory, free_memory=inventory.free_memory, cpus=inventory.cpus,
        cluster=inventory.cluster, volumes=dict(inventory.volumes),
        networks=None if networks is None else sorted(
            str(n["name"]) for n in networks if n.get("exists", True)),
        cpu_models=None if not models else sorted(
            str(m["name"]) for m in models if m.get("runnable") and m.get("allowed", True)),
    )  # fmt: skip


def _replication(host: str, summary: Mapping[str, Any] | None) -> ReplicationFacts | None:
    if not summary:
        return None
    role = str(summary.get("role", "primary"))
    if role == "replica" and summary.get("origin"):
        role = "extended"  # a replica of a replica: its relationship names the origin
    if role not in ("primary", "replica", "extended"):
        return None
    hosts = [summary.get(k) for k in ("primary", "replica", "extended", "origin")]
    partners = sorted({str(h) for h in hosts if h and h != host})
    frequency = summary.get("frequency_s")
    return ReplicationFacts(role=role, state=summary.get("state"),
                            partners=partners,
                            frequency_s=int(frequency) if frequency else None)  # fmt: skip


def storage_of(disks: list[DiskFacts], clustered: bool) -> tuple[StorageKind, str | None]:
    """The kind of a VM's storage as a whole, and its volume when all disks share one."""
    if not disks:
        return StorageKind.NONE, None
    volumes = {d.volume for d in disks}
    if None in volumes:
        return StorageKind.LOCAL, None  # some disk is the host's own: a move copies it
    kind = StorageKind.CLUSTER_VOLUME if clustered else StorageKind.HOST_VOLUME
    return kind, (volumes.pop() if len(volumes) == 1 else None)


def vm_facts(
    host: str,
    view: Mapping[str, Any],
    inventory: HostInventory,
    rate: DirtyRateView | None,
) -> VmFacts:
    """One VM from its ``GET /v1/vms`` view, the host's inventory and its dirty rate."""
    usage = next((v for v in inventory.vms if v.uuid == view["uuid"]), None)
    cluster = view.get("cluster") or (usage.cluster if usage else None)
    disks = []
    for index, disk in enumerate(view.get("disks") or []):
        used = usage.disks[index] if usage and index < len(usage.disks) else None
        disks.append(DiskFacts(path=disk["path"], size=int(disk["size"]),
                               format=disk.get("format", "qcow2"),
                               allocation=used.allocation if used else None,
                               volume=used.volume if used else None))  # fmt: skip
    kind, volume = storage_of(disks, clustered=cluster is not None)
    disks = [d.model_copy(update={"storage": kind if d.volume else StorageKind.LOCAL})
             for d in disks]  # fmt: skip
    nics = view.get("nics")
    networks = sorted({str(n["network"]) for n in nics}) if nics else (
        usage.networks if usage else [])  # fmt: skip
    return VmFacts(
        name=view["name"], uuid=view["uuid"], host=host, state=view["state"],
        memory=int(view["memory"]), cpus=int(view.get("cpus", 1)),
        config_version=int(view["config_version"]), disks=disks, storage=kind, volume=volume,
        cluster=cluster, priority=usage.priority if usage else None,
        cpu_model=view.get("cpu_model") or (usage.cpu_model if usage else None),
        networks=networks, replication=_replication(host, view.get("replication")),
        dirty_rate_bps=rate.dirty_rate_bps if rate else None,
        memory_used=None if rate is None or rate.nonzero_fraction is None
        else int(rate.nonzero_fraction * int(view["memory"])),
        dirty_rate_note=rate.note if rate else f"not measured: the VM is {view['state']}",
    )  # fmt: skip


def link_facts(probe: ProbeView) -> LinkFacts:
    return LinkFacts(src=probe.src, dst=probe.dst, bandwidth_bps=probe.bandwidth_bps,
                     probe_bytes=probe.bytes, probe_s=probe.seconds)  # fmt: skip


def assemble(
    *,
    taken: str,
    hosts: Mapping[str, tuple[Mapping[str, Any], HostInventory, list[Mapping[str, Any]]]],
    rates: Mapping[str, DirtyRateView],
    probes: list[ProbeView],
    clusters: list[ClusterFacts],
    jobs: Mapping[str, list[Mapping[str, Any]]] | None = None,
) -> Inventory:
    """``hosts``: name -> (host view, inventory, VM views); ``rates`` by VM uuid;
    ``jobs``: a source host's job views (its recent moves calibrate its estimates)."""
    host_list, vm_list = [], []
    for name, (view, inventory, vms) in sorted(hosts.items()):
        facts = host_facts(view, inventory)
        moves = samples_of((jobs or {}).get(name) or [])
        host_list.append(facts.model_copy(update={"recent_moves": moves}) if moves else facts)
        for vm in vms:
            if vm.get("incoming"):
                continue  # arriving here: still its source's
            vm_list.append(vm_facts(name, vm, inventory, rates.get(vm["uuid"])))
    return Inventory(taken=taken, hosts=host_list, clusters=clusters, vms=vm_list,
                     links=[link_facts(p) for p in probes])  # fmt: skip
