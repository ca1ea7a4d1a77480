"""What an agent tells the planner: the payloads of its three planner routes.

Pure: data only. Written here, below every layer that reads them (the agent
builds them, the client parses them)::

    GET  /v1/host/inventory              -> HostInventory  (no QEMU is asked)
    GET  /v1/vms/{name}/dirty-rate?seconds=1|2 -> DirtyRateView (QMP calc-dirty-rate)
    POST /v1/host/bandwidth-probe  ProbeRequest -> ProbeView
         (the agent sends ``bytes`` to the peer ``to`` over the agents' TLS
         channel, ``PUT /v1/peer/probe``, and times the upload)
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class DiskUsage(BaseModel):
    path: str
    size: int
    format: str
    allocation: int | None = None  # bytes on the host's file system; None: unreadable
    volume: str | None = None  # the host volume the disk is on


class VmInventory(BaseModel):
    name: str
    uuid: str
    state: str
    memory: int
    cpus: int
    config_version: int
    disks: list[DiskUsage]
    cluster: str | None = None
    priority: str | None = None
    cpu_model: str | None = None
    networks: list[str] = []


class HostInventory(BaseModel):
    name: str
    url: str
    functional_level: int
    memory: int
    free_memory: int  # the host's memory less its live VMs' (what placement counts)
    cpus: int
    volumes: dict[str, str]
    cluster: str | None = None
    vms: list[VmInventory]


class DirtyRateView(BaseModel):
    vm: str
    state: str
    dirty_rate_bps: float | None  # None: not measured (see note)
    calc_time_s: int | None = None
    took_s: float | None = None
    note: str | None = None
    # The share of its memory that is not zero (sampled pages; None: unknown).
    nonzero_fraction: float | None = None


class ProbeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str
    to_url: str
    bytes: int = Field(default=32 * 1024**2, ge=1024**2, le=256 * 1024**2)


class ProbeView(BaseModel):
    src: str
    dst: str
    bytes: int
    seconds: float
    bandwidth_bps: float
