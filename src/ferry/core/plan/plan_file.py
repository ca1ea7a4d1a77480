"""The plan file: what ``ferry plan create`` writes and ``ferry plan apply`` runs.

Pure: no I/O besides the caller's text (``dumps``/``loads``). The file is one
JSON document::

    {"format": "ferry-plan", "version": 1,
     "created": "2026-12-02T01:50:00Z",
     "sources": ["host-1"], "destinations": ["host-2" | "cluster:c2"],
     "policy": null | {...the policy file as read...},
     "inventory": Inventory,            (what the plan was made from)
     "steps": [Step, ...],              (sorted by "order", 1, 2, ...)
     "warnings": ["...", ...],          (the plan's, besides each step's)
     "digest": "sha256:HEX"}

A step (:class:`Step`) carries ``vm``, ``option``, ``reason``,
``estimate_s``, ``downtime_s`` and ``order``, plus what ``plan apply``
needs to run it (``source``, ``destination``, ``storage``, ``cluster``,
``volume``) and to re-check it just before it runs (``preconditions``).
Steps that share a ``group`` (a cluster volume's VMs, one Copy Cluster
Roles run) go together.

``digest`` is SHA-256 over the canonical JSON of every other key (sorted
keys, no spaces), so any edit of the file is detected by :func:`loads`.
:func:`inventory_changes` says what changed between the inventory a plan was
made from and a fresh one, for the stale-plan check before apply.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ferry.core.validation import first_error
from ferry.errors import InvalidInputError

FORMAT: Final = "ferry-plan"
FORMAT_VERSION: Final = 1
MAX_PLAN_BYTES = 16 * 1024**2


class Option(StrEnum):
    """The reference's four migration options (DESIGN.md section 1)."""

    IN_PLACE = "in-place-upgrade"
    EXPORT_IMPORT = "export-import"
    LIVE_MIGRATION = "live-migration"
    COPY_CLUSTER_ROLES = "copy-cluster-roles"
    # Not one of the four: a replica VM moves to another replica host with its
    # recovery points and the primary is told its new replica server
    # (DESIGN.md section 1, Replica); ferry: replication set VM --replica NEW.
    MOVE_REPLICA = "move-replica"


class StorageKind(StrEnum):
    """Where a VM's disks live, as the planner sees it."""

    LOCAL = "local"  # the host's own disk (image_dirs/data dir)
    HOST_VOLUME = "host-volume"  # a named volume of a standalone host (a share others may see)
    CLUSTER_VOLUME = "cluster-volume"  # a cluster's shared volume (CSV)
    NONE = "none"  # no disks at all


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DiskFacts(_Model):
    path: str
    size: int  # virtual size, bytes
    allocation: int | None = None  # bytes in use on the host (None: not measured)
    format: str = "qcow2"
    storage: StorageKind = StorageKind.LOCAL
    volume: str | None = None  # the volume the disk is on, for a volume kind


class ReplicationFacts(_Model):
    role: Literal["primary", "replica", "extended"]
    state: str | None = None
    partners: list[str] = []  # the other hosts of the relationship
    frequency_s: int | None = None


class VmFacts(_Model):
    name: str
    uuid: str
    host: str
    state: str
    memory: int  # bytes
    cpus: int = 1
    config_version: int
    disks: list[DiskFacts] = []
    storage: StorageKind = StorageKind.NONE  # the kind of all its disks (the widest)
    volume: str | None = None
    cluster: str | None = None
    priority: str | None = None
    cpu_model: str | None = None
    networks: list[str] = []
    replication: ReplicationFacts | None = None
    # Bytes of guest memory dirtied per second (QMP calc-dirty-rate); None:
    # not measured (the VM is off, or the measurement failed: see dirty_rate_note).
    dirty_rate_bps: float | None = None
    dirty_rate_note: str | None = None
    # Bytes of its memory that are not zero (sampled by the agent); None: unknown.
    memory_used: int | None = None

    @property
    def is_replica(self) -> bool:
        """A replica (or extended replica) copy of a VM that runs elsewhere."""
        return self.replication is not None and self.replication.role != "primary"

    @property
    def disk_bytes(self) -> int:
        """What a disk copy sends: the allocation where known, else the virtual size."""
        return sum(d.allocation if d.allocation is not None else d.size for d in self.disks)


class MoveSample(_Model):
    """One finished live move from a host, as its job's result and progress said."""

    finished: float = 0.0  # the job's last update, seconds since the epoch
    total_s: float
    downtime_ms: float = 0.0
    storage: str = "shared"
    disk_copy_s: float = 0.0
    disk_bytes: int | None = None  # the mirrors' total
    memory_copy_s: float = 0.0  # from the memory stream's start to the move's end
    memory_bytes: int | None = None  # the guest's RAM as QEMU counted it
    memory_sent: int | None = None  # RAM bytes QEMU sent (zero pages barely count)


class HostFacts(_Model):
    name: str
    url: str
    version: str = ""
    functional_level: int
    supported_config_versions: tuple[int, int] = (1, 1)
    memory: int  # bytes
    free_memory: int  # bytes the host can still give VMs
    cpus: int = 1
    cluster: str | None = None
    volumes: dict[str, str] = {}
    # None: the host does not report them (older agent); [] : it has none.
    networks: list[str] | None = None
    cpu_models: list[str] | None = None
    reachable: bool = True
    # The host's recent finished live moves (newest last): the estimates' calibration.
    recent_moves: list[MoveSample] = []


class LinkFacts(_Model):
    """The bandwidth measured from ``src`` to ``dst`` over the agents' TLS channel."""

    src: str
    dst: str
    bandwidth_bps: float  # bytes per second
    probe_bytes: int = 0
    probe_s: float = 0.0


class ClusterFacts(_Model):
    name: str
    functional_level: int | None = None
    nodes: list[str] = []
    volumes: dict[str, str] = {}


class Inventory(_Model):
    taken: str  # ISO 8601 UTC
    hosts: list[HostFacts] = []
    clusters: list[ClusterFacts] = []
    vms: list[VmFacts] = []
    links: list[LinkFacts] = []

    def host(self, name: str) -> HostFacts | None:
        return next((h for h in self.hosts if h.name == name), None)

    def vm(self, name: str) -> VmFacts | None:
        """The VM ``name`` itself (not a replica of it)."""
        return next((v for v in self.vms if v.name == name and not v.is_replica), None)

    def find(self, uuid: str, *, replica: bool = False) -> VmFacts | None:
        """The VM ``uuid`` (its primary or only copy), or with ``replica`` its replica copy.

        A replica host lists the replica under the VM's own name and UUID.
        """
        return next((v for v in self.vms if v.uuid == uuid and v.is_replica == replica), None)

    def link(self, src: str, dst: str) -> LinkFacts | None:
        return next((lk for lk in self.links if (lk.src, lk.dst) == (src, dst)), None)


class Preconditions(_Model):
    """What must still hold just before a step runs (apply re-checks it)."""

    vm_uuid: str
    vm_host: str  # where the VM must be
    replica: bool = False  # the step moves the VM's replica copy (Option.MOVE_REPLICA)
    config_version: int
    state: str  # the state the plan saw; a live option needs it running
    must_be_running: bool = False
    destination_free_memory: int = 0  # bytes the destination must have free
    destination_functional_level: int = 0  # at least this
    networks: list[str] = []  # the destination must have these networks
    cpu_model: str | None = None  # and be able to run this CPU model
    after: list[int] = []  # orders of steps that must be done first


class Step(_Model):
    order: int = Field(ge=1)
    vm: str
    option: Option
    reason: str  # in the reference's terms
    estimate_s: float = Field(ge=0)
    downtime_s: float = Field(ge=0)
    source: str  # host
    destination: str  # host (the node, for a cluster destination)
    destination_cluster: str | None = None
    storage: Literal["shared", "copy"] | None = None  # for live migration
    # A live move's downtime limit (the policy's max-downtime), given to the move.
    downtime_limit_ms: int | None = None
    volume: str | None = None  # the cluster volume, for moves into or between clusters
    group: str | None = None  # steps with one group go together
    # Set when the option as planned is one of ferry's improvements over the
    # reference (e.g. "live migration without leaving the cluster").
    improvement: str | None = None
    warnings: list[str] = []
    preconditions: Preconditions


class Plan(_Model):
    format: Literal["ferry-plan"] = FORMAT
    version: Literal[1] = FORMAT_VERSION
    created: str
    sources: list[str]
    destinations: list[str]
    policy: dict[str, Any] | None = None
    inventory: Inventory
    steps: list[Step]
    warnings: list[str] = []
    digest: str = ""


def _canonical(doc: dict[str, Any]) -> bytes:
    body = {k: v for k, v in doc.items() if k != "digest"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def digest_of(doc: dict[str, Any]) -> str:
    """The digest a plan document must carry (every key but ``digest``)."""
    return "sha256:" + hashlib.sha256(_canonical(doc)).hexdigest()


def sealed(plan: Plan) -> Plan:
    """``plan`` with its digest set."""
    return plan.model_copy(update={"digest": digest_of(plan.model_dump(mode="json"))})


def dumps(plan: Plan) -> str:
    """The file's text (indented for people, digest set)."""
    doc = sealed(plan).model_dump(mode="json")
    return json.dumps(doc, indent=2) + "\n"


def loads(text: str | bytes, *, source: str = "plan file") -> Plan:
    """Read a plan; refuse one that is not a plan, is of another version, or was edited."""
    if len(text) > MAX_PLAN_BYTES:
        raise InvalidInputError(f"{source} is larger than {MAX_PLAN_BYTES // 1024**2} MiB")
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(
            f"{source} is not JSON ({exc}): give a file from ferry plan create"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InvalidInputError(f"{source} is not a ferry plan: give a file from ferry plan create")
    if doc.get("version") != FORMAT_VERSION:
        raise InvalidInputError(
            f"{source} is a version {doc.get('version')!r} plan; this ferry reads version "
            f"{FORMAT_VERSION}: make it again with ferry plan create"
        )
    if doc.get("digest") != digest_of(doc):
        raise InvalidInputError(
            f"{source} was edited after ferry plan create wrote it (its digest does not match): "
            "make a new plan with ferry plan create"
        )
    try:
        return Plan.model_validate(doc)
    except ValidationError as exc:
        raise InvalidInputError(f"{source}: {first_error(exc, whole='plan')}") from None


def inventory_changes(plan: Plan, now: Inventory) -> list[str]:
    """What changed since the plan was made that its steps depend on; [] if nothing."""
    changes: list[str] = []
    for step in plan.steps:
        pre = step.preconditions
        then = plan.inventory.find(pre.vm_uuid, replica=pre.replica)
        vm = now.find(pre.vm_uuid, replica=pre.replica)
        if vm is None:
            changes.append(f"{'the replica of ' if pre.replica else ''}VM {step.vm!r} is gone")
            continue
        if vm.host != pre.vm_host:
            changes.append(f"VM {step.vm!r} is on {vm.host!r} now, not {pre.vm_host!r}")
        if vm.config_version != pre.config_version:
            changes.append(
                f"VM {step.vm!r} has config version {vm.config_version}, not {pre.config_version}"
            )
        if then is not None:
            if vm.memory != then.memory:
                changes.append(
                    f"VM {step.vm!r} has {_mib(vm.memory)} memory, not {_mib(then.memory)}"
                )
            if [d.size for d in vm.disks] != [d.size for d in then.disks]:
                changes.append(f"VM {step.vm!r} has other disks or disk sizes")
            if vm.storage != then.storage:
                changes.append(f"VM {step.vm!r} storage is {vm.storage}, not {then.storage}")
        if pre.must_be_running and vm.state != "running":
            changes.append(f"VM {step.vm!r} is {vm.state}, not running")
        elif {pre.state, vm.state} == {"off", "running"}:
            changes.append(f"VM {step.vm!r} is {vm.state} now, not {pre.state} as planned")
    # A VM the plan never saw, on a host it empties, would be left behind. (One the plan
    # saw elsewhere has a step whose check above says where it is, or moved by a step.)
    known = {v.uuid for v in plan.inventory.vms}
    sources = source_hosts(plan)
    for vm in now.vms:
        if vm.host in sources and vm.uuid not in known:
            changes.append(f"VM {vm.name!r} is new on {vm.host}")
    for host in plan.inventory.hosts:
        if now.host(host.name) is None:
            changes.append(f"host {host.name!r} is gone")
    return changes


def source_hosts(plan: Plan) -> set[str]:
    """The hosts the plan moves VMs from: its sources (a ``cluster:NAME`` is the cluster's
    hosts in the plan's inventory) and every step's source."""
    named = set(plan.sources)
    clusters = {n.removeprefix("cluster:") for n in named if n.startswith("cluster:")}
    hosts = {h.name for h in plan.inventory.hosts if h.name in named or h.cluster in clusters}
    return hosts | {s.source for s in plan.steps}


def _mib(n: int) -> str:
    return f"{n // 1024**2}M"
