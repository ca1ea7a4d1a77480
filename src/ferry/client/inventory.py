"""Collect the planner's inventory from the agents: hosts, VMs, dirty rates, links.

Names are checked first (an unknown host or cluster is one line before any
agent is asked). Then, all bounded: each host's view, inventory and VMs at
once; each running VM's dirty rate (its QEMU measures for two seconds, all
VMs at once); one bandwidth probe per source/destination pair, one after
another so they do not share the link. :mod:`ferry.core.plan.facts` puts the answers
together.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ferry.client.fleet import Fleet
from ferry.core.plan.agent_facts import DirtyRateView, HostInventory, ProbeView
from ferry.core.plan.facts import assemble
from ferry.core.plan.plan_file import ClusterFacts, Inventory
from ferry.errors import ConnectionFailedError, FerryError, InvalidInputError, NotFoundError

CLUSTER_PREFIX = "cluster:"
PROBE_BYTES = 32 * 1024**2
DIRTY_RATE_S = 2  # 1 s read 0 MiB/s once from a guest rewriting 128 MiB (load ~16)


@dataclass(frozen=True)
class Side:
    """The hosts a ``--from`` or ``--to`` list names, and the clusters among them."""

    hosts: tuple[str, ...]
    clusters: tuple[str, ...]
    named: tuple[str, ...]  # as the admin wrote them


async def _memberships(fleet: Fleet) -> dict[str, str]:
    """host -> the cluster it is a node of (hosts in no cluster, or away, left out)."""
    answers = await fleet.each("/v1/cluster")
    return {host: str(info["name"]) for host, info in answers.items()
            if isinstance(info, dict) and info.get("name")}  # fmt: skip


async def resolve(fleet: Fleet, names: Iterable[str], *, flag: str) -> Side:
    """Hosts and ``cluster:NAME`` entries -> the hosts; NotFoundError for an unknown one."""
    named = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not named:
        raise InvalidInputError(f"{flag} needs at least one host or cluster:NAME")
    hosts: list[str] = []
    clusters: list[str] = []
    members: dict[str, str] | None = None
    for name in named:
        if name.startswith(CLUSTER_PREFIX):
            cluster = name[len(CLUSTER_PREFIX) :]
            if members is None:
                members = await _memberships(fleet)
            nodes = sorted(h for h, c in members.items() if c == cluster)
            if not nodes:
                raise NotFoundError(f"unknown cluster {cluster!r} in {flag}: no known host is "
                                    "a node of it ('ferry cluster list' shows them)")  # fmt: skip
            clusters.append(cluster)
            hosts += nodes
        else:
            if name not in fleet.settings.hosts:
                known = ", ".join(sorted(fleet.settings.hosts)) or "none"
                raise NotFoundError(f"unknown host {name!r} in {flag} (known hosts: {known}; "
                                    "write a cluster as cluster:NAME)")  # fmt: skip
            hosts.append(name)
    return Side(tuple(dict.fromkeys(hosts)), tuple(clusters), named)


async def _host(fleet: Fleet, name: str) -> tuple[dict[str, Any], HostInventory, list[Any]]:
    client = fleet.client(name)
    try:
        view, inventory, vms = await asyncio.gather(
            client.get("/v1/host"), client.get("/v1/host/inventory"), client.get("/v1/vms")
        )
    except ConnectionFailedError as exc:
        raise ConnectionFailedError(f"cannot take the inventory of host {name!r}: {exc}") from exc
    return view, HostInventory.model_validate(inventory), vms


async def _rate(fleet: Fleet, host: str, vm: dict[str, Any]) -> DirtyRateView:
    try:
        answer = await fleet.client(host).get(f"/v1/vms/{vm['name']}/dirty-rate",
                                              seconds=str(DIRTY_RATE_S))  # fmt: skip
        return DirtyRateView.model_validate(answer)
    except FerryError as exc:
        # A VM that stopped, or a QEMU that would not measure: the plan says so.
        return DirtyRateView(vm=vm["name"], state=vm["state"], dirty_rate_bps=None,
                             note=f"not measured: {exc}")  # fmt: skip


async def _probe(fleet: Fleet, src: str, dst: str, nbytes: int) -> ProbeView:
    url = fleet.settings.host(dst).url
    answer = await fleet.client(src).post("/v1/host/bandwidth-probe",
                                          {"to": dst, "to_url": url, "bytes": nbytes})  # fmt: skip
    return ProbeView.model_validate(answer)


async def _jobs(fleet: Fleet, host: str) -> list[Any]:
    """The host's jobs (``ferry job list``'s call): its finished moves calibrate the
    estimates; an agent that will not say leaves the default constants."""
    try:
        answer = await fleet.client(host).get("/v1/jobs")
    except FerryError:
        return []
    return answer if isinstance(answer, list) else []


async def _cluster(fleet: Fleet, cluster: str, nodes: list[str]) -> ClusterFacts:
    for node in nodes:
        try:
            view = await fleet.client(node).get(f"/v1/clusters/{cluster}")
        except FerryError:
            continue
        volumes = {str(v["name"]): str(v["path"]) for v in view.get("volumes") or []}
        return ClusterFacts(name=cluster, functional_level=view.get("functional_level"),
                            nodes=[str(n["name"]) for n in view.get("nodes") or []],
                            volumes=volumes)  # fmt: skip
    return ClusterFacts(name=cluster, nodes=nodes)


async def collect(
    fleet: Fleet,
    sources: Side,
    destinations: Side,
    *,
    probe_bytes: int = PROBE_BYTES,
    say: Callable[[str], None] = lambda _: None,
) -> Inventory:
    """The inventory of every named host, the dirty rates of the sources' running
    VMs and the bandwidth of every source -> destination pair."""
    names = list(dict.fromkeys(sources.hosts + destinations.hosts))
    say(f"inventory of {len(names)} host(s)")
    answers = await asyncio.gather(*(_host(fleet, n) for n in names))
    hosts = dict(zip(names, answers, strict=True))
    running = [(h, vm) for h in sources.hosts for vm in hosts[h][2]
               if vm.get("state") == "running" and not vm.get("incoming")]  # fmt: skip
    say(f"dirty rate of {len(running)} running VM(s) ({DIRTY_RATE_S} s each, at once)")
    measured = await asyncio.gather(*(_rate(fleet, h, vm) for h, vm in running))
    rates = {vm["uuid"]: rate for (_, vm), rate in zip(running, measured, strict=True)}
    say(f"recent moves of {len(sources.hosts)} source host(s) (estimate calibration)")
    found = await asyncio.gather(*(_jobs(fleet, h) for h in sources.hosts))
    jobs = dict(zip(sources.hosts, found, strict=True))
    probes = []
    for src in sources.hosts:
        for dst in destinations.hosts:
            if src != dst:
                say(f"bandwidth {src} -> {dst} ({probe_bytes // 1024**2} MiB over TLS)")
                probes.append(await _probe(fleet, src, dst, probe_bytes))
    members: dict[str, list[str]] = {}
    for name in names:
        cluster = hosts[name][1].cluster
        if cluster:
            members.setdefault(cluster, []).append(name)
    clusters = [await _cluster(fleet, c, nodes) for c, nodes in sorted(members.items())]
    taken = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return assemble(taken=taken, hosts=hosts, rates=rates, probes=probes, clusters=clusters,
                    jobs=jobs)  # fmt: skip
