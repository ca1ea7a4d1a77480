"""A host's configuration (``host.toml``), validated.

Example::

    name = "host-1"
    listen = "127.0.0.1:8443"
    data_dir = "/var/lib/ferry"
    tls_dir = "/etc/ferry/tls"          # ca-cert.pem, server-*.pem, client-*.pem
    functional_level = 3                # highest VM configuration version run here
    accelerator = "auto"                # auto | kvm | tcg
    image_dirs = ["/srv/images"]        # where --image/--kernel files may come from
    cluster_lease_ttl = 10              # seconds; a cluster node's lease
    cpu_models = ["Westmere-v1", "max"] # only these CPU models here (absent: all QEMU runs)
    metrics_listen = "127.0.0.1:9464"   # plain-HTTP GET /metrics, loopback only (optional)

    [networks.prod]                     # host network "prod": a name for a bridge
    bridge = "br0"                      # (netns = "NS": a bridge inside that namespace)
"""

from __future__ import annotations

import hashlib
import ipaddress
import tempfile
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ferry.core.cpu_models import check_model_name
from ferry.core.network import check_ifname, check_netns
from ferry.core.spec import check_name
from ferry.core.units import parse_size
from ferry.core.validation import first_error
from ferry.core.versions import MAX_CONFIG_VERSION, check_functional_level
from ferry.errors import ConfigError, FerryError


def check_loopback_listen(value: str) -> str:
    """``ADDRESS:PORT`` on a loopback address (what an unauthenticated listener may use)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("use ADDRESS:PORT on a loopback address, e.g. 127.0.0.1:9464")
    address = host.strip("[]")
    try:
        loopback = address == "localhost" or ipaddress.ip_address(address).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"{value} is not a loopback address: the plain metrics listener has no "
            "authentication, so it may only listen on 127.0.0.0/8, ::1 or "
            "localhost; scrape the admin port with an admin certificate instead"
        )
    return value


class NetworkConfig(BaseModel):
    """A host network in host.toml: the bridge its NICs join (in ``netns`` if set)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bridge: str
    netns: str | None = None

    @model_validator(mode="after")
    def _names(self) -> NetworkConfig:
        check_ifname(self.bridge)
        if self.netns is not None:
            check_netns(self.netns)
        return self


class HostConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    listen: str = "127.0.0.1:8443"
    data_dir: Path
    tls_dir: Path
    functional_level: int = MAX_CONFIG_VERSION
    accelerator: Literal["auto", "kvm", "tcg"] = "auto"
    image_dirs: tuple[Path, ...] = ()
    guest_cache: Path | None = None
    run_dir: Path | None = None
    qemu_binary: str = "qemu-system-x86_64"
    qemu_img: str = "qemu-img"
    # QEMU firmware descriptors (Debian's ovmf installs them): where UEFI VMs find OVMF.
    firmware_descriptors: Path = Path("/usr/share/qemu/firmware")
    stop_timeout_s: float = Field(default=30.0, gt=0)
    # Live migration: simultaneous moves per host (more wait in a queue), and
    # the default bandwidth cap per move in bytes/s ("1G" style accepted).
    max_live_migrations: int = Field(default=2, ge=1, le=16)
    migration_max_bandwidth: int = Field(default=1024**3, ge=0)
    # The cap on all replication traffic this host sends, bytes/s (0: none).
    replication_max_bandwidth: int = Field(default=0, ge=0)
    # Test hook: damage one byte in each of the next N replication streams this
    # host sends, so tests can prove the replica rejects and the primary resends.
    corrupt_replication_streams: int = Field(default=0, ge=0)
    # Test hook: every VM's QEMU gets a second QMP monitor, {runtime}/{short uuid}.tqmp,
    # where benchmarks inject guest writes (HMP qemu-io) while the agent holds the first.
    test_monitor: bool = False
    # Test hook: the agent exits at once (as if killed) when a failover job
    # enters this phase, so tests can prove the restart leaves a state that
    # can be completed or cancelled. Empty: never.
    crash_failover_at: str = ""
    # Test hook: a clustered VM's move (in its cluster, or into another) waits
    # this long right after its hand-over transaction, before it asks the
    # destination to resume, so a test can lose the source node in that
    # window. 0: never.
    hold_after_handover_s: float = 0.0
    # Plain TCP for memory and disk streams: only for a trusted network.
    insecure_migration: bool = False
    # QEMU's image locks on disk files (on by default, as on real hosts). Lab
    # hosts share one kernel, so a lock refuses a second writer that separate
    # machines would not: fencing tests turn it off so that only fencing keeps
    # two QEMUs from writing one clustered disk.
    image_locking: bool = True
    # The node's cluster lease TTL in seconds; every cluster timing (renewal,
    # self-fence deadline, guard limit) derives from it (core/cluster/timing.py).
    cluster_lease_ttl: int = Field(default=10, ge=2, le=300)
    # Host networks (name -> bridge); more are added with 'ferry host network add'.
    networks: dict[str, NetworkConfig] = {}
    # The CPU models VMs may use on this host (empty: every model its QEMU can
    # run). Moves, failovers and imports of a VM with another model are refused.
    cpu_models: tuple[str, ...] = ()
    # A plain-HTTP listener for GET /metrics (Prometheus), loopback only: it has no
    # authentication. None: metrics only on the admin TLS port.
    metrics_listen: str | None = None

    @field_validator("migration_max_bandwidth", "replication_max_bandwidth", mode="before")
    @classmethod
    def _bandwidth(cls, value: object) -> object:
        return parse_size(value, what="bandwidth") if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value, what="host name")

    @field_validator("networks")
    @classmethod
    def _networks(cls, value: dict[str, NetworkConfig]) -> dict[str, NetworkConfig]:
        for name in value:  # the same rule as 'ferry host network add'
            check_name(name, what="network name")
        return value

    @field_validator("cpu_models")
    @classmethod
    def _cpu_models(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_model_name(name) for name in value)

    @field_validator("functional_level")
    @classmethod
    def _level(cls, value: int) -> int:
        return check_functional_level(value)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("use ADDRESS:PORT, e.g. 127.0.0.1:8443")
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_listen(cls, value: str | None) -> str | None:
        if value is not None:
            check_loopback_listen(value)
        return value

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        if self.metrics_listen is None:
            return None
        host, _, port = self.metrics_listen.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def runtime_dir(self) -> Path:
        """Where QMP sockets live: short, because unix socket paths are."""
        if self.run_dir is not None:
            return self.run_dir
        digest = hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:10]
        return Path(tempfile.gettempdir()) / f"ferry-{digest}"


def load_host_config(path: Path) -> HostConfig:
    """Read and validate ``path``; one clear ConfigError for anything wrong."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"host config {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read host config {path}: {exc}") from exc
    try:
        return HostConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"host config {path}: {first_error(exc, whole='config')}") from exc
    except FerryError as exc:
        raise ConfigError(f"host config {path}: {exc}") from exc
