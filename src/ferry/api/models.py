"""The agent's API payloads: the one place the wire format is written down.

All bodies are JSON. Errors come back with a non-2xx status and
``{"error": {"code": <FerryError.code>, "message": <one line>}}``.

Admin endpoints (admin certificate)::

    GET    /v1/host                     -> HostView
    GET    /v1/vms                      -> [VmView]
    POST   /v1/vms        CreateVmRequest -> VmView   (with ``cluster``: a clustered VM,
                                  placed on a node of it; VmView.host is its owner)
    GET    /v1/vms/{name}               -> VmView
    POST   /v1/vms/{name}/start         -> VmView
    POST   /v1/vms/{name}/stop  StopRequest -> StopResult
    POST   /v1/vms/{name}/kill          -> VmView
    POST   /v1/vms/{name}/pause         -> VmView
    POST   /v1/vms/{name}/resume        -> VmView
    DELETE /v1/vms/{name}?force=0|1     -> {"deleted": name}
    GET    /v1/vms/{name}/console?offset=N -> ConsoleChunk
    POST   /v1/vms/{name}/move  MoveRequest -> job (202)
    POST   /v1/vms/{name}/upgrade-version -> VmView
    POST   /v1/vms/{name}/export ExportRequest -> job (202)
    POST   /v1/imports    ImportRequest -> job (202)   (with ``cluster``, ``volume``: clustered)
    POST   /v1/vms/{name}/refresh       -> {vm, old_pid, pid, downtime_ms, total_s}
    POST   /v1/host/refresh-vms         -> {"host", "results": [{vm, old_pid, pid, ...}]}
    GET    /v1/host/upgrade-check       -> {"host", "version", "schema_version", ...}
    GET    /v1/replica-server           -> ReplicaServerSettings
    PUT    /v1/replica-server  ReplicaServerSettings -> ReplicaServerSettings
    DELETE /v1/replica-server           -> ReplicaServerSettings (disabled)
    POST   /v1/vms/{name}/replication  EnableReplicationRequest -> status (201)
    GET    /v1/vms/{name}/replication   -> status (primary or replica view)
    PATCH  /v1/vms/{name}/replication  SetReplicationRequest -> status
    POST   /v1/vms/{name}/replication/pause|resume -> status
    POST   /v1/vms/{name}/replication/sync -> {result, bytes, duration_s, point | error}
    DELETE /v1/vms/{name}/replication   -> {vm, replica, removed, replica_vm_kept}
    GET    /v1/vms/{name}/replication/points -> [{id, time, size, consistent}]
    POST   /v1/replication/import-initial  ImportInitialRequest -> {vm, point, bytes, ...}
    POST   /v1/vms/{name}/replication/reverse -> job (202); its result: the new status
    POST   /v1/vms/{name}/replication/extend  ExtendReplicationRequest -> extension (201)
           (on the replica host; ``sync`` and ``status`` there act on the extension)
    DELETE /v1/vms/{name}/replication/extend -> {vm, extended, removed, extended_vm_kept}
    POST   /v1/vms/{name}/failover/test|stop-test|start|complete|cancel FailoverRequest
           -> job (202); its result {vm, host, point, ...}   (on the replica host)
    POST   /v1/vms/{name}/failover/planned -> job (202)   (on the primary host)
    GET    /v1/jobs                     -> [job]
    GET    /v1/jobs/{id}                -> job
    POST   /v1/jobs/{id}/cancel         -> job
    GET    /v1/networks                 -> [NetworkView]
    POST   /v1/networks   NetworkRequest -> NetworkView (201; the bridge must exist)
    DELETE /v1/networks/{name}          -> [NetworkView]  (refused while a VM uses it)
    GET    /v1/volumes                  -> {name: path}
    GET    /v1/host/inventory           -> HostInventory   (the planner's facts, no QEMU asked)
    GET    /v1/vms/{name}/dirty-rate?seconds=1|2 -> DirtyRateView  (QMP calc-dirty-rate)
    POST   /v1/host/bandwidth-probe ProbeRequest -> ProbeView  (N bytes to the peer's
           PUT /v1/peer/probe over the agents' TLS channel, timed; ferry.peer.probe)
           (these three payloads: ferry.core.plan.agent_facts)
    POST   /v1/volumes    VolumeRequest -> {name: path}
    DELETE /v1/volumes/{name}           -> {name: path}
    POST   /v1/clusters/{c}/vms ClusterVmRequest -> VmView; DELETE /v1/clusters/{c}/vms/{vm},
    drain, resume, upgrade-level: see ferry.api.cluster_vms

A job is ``{"id","kind","vm","vm_uuid","host","state","created","updated",...}``;
a move adds ``"phase","target","storage","progress":{...},"result","error"``.

Peer endpoints (a host certificate of the same CA, or an admin)::

    GET    /v1/peer/hello               -> Hello (ferry.peer.replication)
    GET    /v1/peer/replica-server/admission -> {storage, trust_group, rule} or 403
    POST   /v1/peer/migrations {job_id, spec, storage, disk_volumes} -> {storage}
    PUT    /v1/peer/migrations/{id}/files/{kernel|initrd}  (raw bytes)
    POST   /v1/peer/migrations/{id}/launch -> {uri, nbd: {host, port} | null, tls}
    POST   /v1/peer/migrations/{id}/finish -> {state}   (switch-over: resume here)
    POST   /v1/peer/migrations/{id}/abort  -> {state}
    GET    /v1/peer/migrations/{id}        -> {state, error}

Replication (the caller is the primary; the replica pins its certificate):
``/v1/peer/replicas...`` and ``POST /v1/peer/replications`` (the takeover
after a move), written down with their payloads in :mod:`ferry.peer.replication`.

Failover::

    GET    /v1/peer/vms/{uuid}          -> {state}   (split-brain guard)
    POST   /v1/peer/replications/{uuid}/yield  (the replica failed over) -> {vm, yielded}
    POST   /v1/peer/replicas/{uuid}/failover   (planned: the VM is off here) -> {vm, point}

Migration endpoints need a *host* certificate: its DN becomes the QEMU
``tls-authz`` identity that may feed the destination.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ferry.core.cpu_models import CpuModel

MAX_DISK = 64 * 1024**4


class DiskView(BaseModel):
    path: str
    size: int
    format: str
    # The UEFI variable store (pflash1), carried like a disk, never seen by the guest.
    firmware: bool = False


class NicView(BaseModel):
    network: str
    mac: str
    model: str
    # The test guest's address on a lab network (derived from its MAC), else None.
    ip: str | None = None


class NetworkView(BaseModel):
    """A host network: a name for a bridge (``netns``: the bridge is in that namespace)."""

    name: str
    bridge: str
    netns: str | None = None
    exists: bool
    source: Literal["host.toml", "added"]


class VmView(BaseModel):
    name: str
    uuid: str
    host: str
    state: str
    config_version: int
    memory: int
    cpus: int
    disks: list[DiskView]
    kernel: str | None = None
    append: str | None = None
    pid: int | None = None
    # True while the VM is arriving here by live migration and still runs
    # on its source host (which is where commands should go).
    incoming: bool = False
    # The job that holds the VM's disks now ("a move", "a replication cycle",
    # "a live export", "refresh-vms"); others wait for their turn.
    busy: str | None = None
    # {"role", "state", "primary", "replica", "frequency_s"} when replicated.
    replication: dict[str, object] | None = None
    # The cluster the VM belongs to (its config and owner live there), or None.
    cluster: str | None = None
    # "vnc": a graphical console on a unix socket, relayed by GET /v1/vms/{name}/vnc.
    display: str = "none"
    vnc: bool = False
    nics: list[NicView] = []
    # The QEMU CPU model it runs ("max" for VMs made before models were chosen).
    cpu_model: str = "max"
    # A QEMU guest agent channel (vm create --guest-agent).
    guest_agent: bool = False
    # "bios" or "uefi", and which disk it boots (an index into the guest's disks).
    firmware: str = "bios"
    boot_disk: int = 0


class HostView(BaseModel):
    name: str
    url: str
    version: str
    functional_level: int
    supported_config_versions: tuple[int, int]
    accelerator: str
    qemu_version: str
    memory: int
    cpus: int
    vms: int
    running_vms: int
    data_dir: str
    schema_version: int
    networks: list[NetworkView] = []
    # QEMU's CPU models under this host's accelerator: {name, runnable,
    # unavailable_features, allowed} (allowed: host.toml cpu_models lets VMs use it).
    cpu_models: list[CpuModel] = []
    # The firmware VMs can boot here: "bios" always, "uefi" when OVMF is installed.
    firmware: list[str] = ["bios"]


class DiskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    size: int | None = Field(default=None, gt=0, le=MAX_DISK)
    image: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DiskRequest:
        if (self.size is None) == (self.image is None):
            raise ValueError("a disk needs exactly one of size or image")
        return self


class NicRequest(BaseModel):
    """One NIC of a new VM: ``mac`` None gets a new one, kept for the VM's life."""

    model_config = ConfigDict(extra="forbid")

    network: str
    mac: str | None = None
    model: str = "virtio"


class NetworkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    bridge: str
    netns: str | None = None


class CreateVmRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    memory: int = Field(default=256 * 1024**2, gt=0)
    cpus: int = Field(default=1, gt=0)
    disks: list[DiskRequest] = []
    guest: Literal["test"] | None = None
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    config_version: int | None = None
    volume: str | None = None
    # A clustered VM: its cluster, priority for HA, and the node it must run
    # on (None: placement picks). The disks go on the cluster volume ``volume``.
    cluster: str | None = None
    priority: Literal["high", "medium", "low"] = "medium"
    node: str | None = None
    display: Literal["none", "vnc"] = "none"
    nics: list[NicRequest] = []
    guest_agent: bool = False
    # None: the host's default (a named model on KVM, "max" under TCG).
    cpu_model: str | None = None
    # "uefi": OVMF with the VM's own variable store; the disk it boots (0: the first).
    firmware: Literal["bios", "uefi"] = "bios"
    boot_disk: int = Field(default=0, ge=0)


class ClusterVmRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vm: str
    priority: Literal["high", "medium", "low"] = "medium"


class NodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node: str


class MoveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str = ""  # a host (empty with to_cluster: the target cluster's placement picks)
    to_url: str = ""
    # vm move --to-cluster C2 [--volume V]: into another cluster (api/cluster_moves.py)
    to_cluster: str | None = None
    volume: str | None = None
    storage: Literal["auto", "shared", "copy"] = "auto"
    max_bandwidth: int | None = Field(default=None, ge=0)
    downtime_limit_ms: int | None = Field(default=None, gt=0, le=600_000)
    # --network-map: the VM's network -> the destination's network for it.
    network_map: dict[str, str] = {}
    # --postcopy: switch to post-copy after the first pass (a failed link loses the VM)
    postcopy: bool = False


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str
    live: bool = False
    max_bandwidth: int | None = Field(default=None, gt=0)  # bytes/s, live exports only


class ImportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    folder: str
    mode: Literal["register", "copy", "new-id"] = "copy"
    name: str | None = None
    # Both or neither: import as a clustered VM of the host, files on that cluster volume.
    cluster: str | None = None
    volume: str | None = None
    # --network-map: the exported VM's network -> this host's network for it.
    network_map: dict[str, str] = {}


class AdoptRequest(BaseModel):
    """``vm import --libvirt FILE`` / ``--ovf FILE``: a document on the host, in its image dirs."""

    model_config = ConfigDict(extra="forbid")

    origin: Literal["libvirt", "ovf"]
    path: str
    name: str | None = None
    # --network-map: the source's network -> this host's network for it.
    network_map: dict[str, str] = {}


class VolumeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    path: str


class StopRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout_s: float | None = Field(default=None, gt=0, le=3600)


class StopResult(BaseModel):
    vm: VmView
    forced: bool


class ConsoleChunk(BaseModel):
    text: str
    offset: int


class EnableReplicationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replica: str
    replica_url: str
    frequency_s: int = 300
    recovery_points: int = Field(default=4, ge=0, le=24)
    initial: Literal["network", "media", "existing"] = "network"
    media_dir: str | None = None
    compression: bool = True
    initial_after: float | None = None  # Unix time: start the initial copy then
    # --network-map: the VM's network -> the replica host's network a failover uses.
    network_map: dict[str, str] = {}
    # --app-consistent-every: freeze the guest's file systems for one cut per interval.
    app_consistent_every_s: int | None = Field(default=None, ge=0)


class ExtendReplicationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str
    to_url: str
    frequency_s: int | None = None  # default: 5m, or the primary's frequency if longer
    recovery_points: int | None = Field(default=None, ge=0, le=24)


class SetReplicationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replica: str | None = None
    replica_url: str | None = None
    frequency_s: int | None = None
    recovery_points: int | None = Field(default=None, ge=0, le=24)
    certificate_thumbprint: str | None = None
    network_map: dict[str, str] | None = None  # replaces the relationship's whole map
    app_consistent_every_s: int | None = Field(default=None, ge=0)  # 0: off


class ImportInitialRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    folder: str


class FailoverRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    point: int | None = None
    force: bool = False
    # ``failover test``: the network of the replica host the test VM's NICs join
    # (new MACs); None: the test VM has no NIC.
    test_network: str | None = None
