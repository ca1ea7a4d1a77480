"""``<data_dir>/cluster.json``: which cluster this host belongs to, across agent restarts.

::

    {"name": "c1", "etcd": ["https://127.0.0.1:2379"], "etcd_tls": "/etc/ferry/tls" | null,
     "lease": 7587869893489123}

Written (atomically: a temporary file, fsync, rename, fsync of the dir) when
the host joins and whenever its lease changes; removed when it leaves. On
start the agent reconnects with it, keeping the lease if etcd still has it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ferry.adapters.durable import fsync_dir, fsync_file
from ferry.adapters.os_errors import os_errors
from ferry.errors import ConfigError

FILE = "cluster.json"


@dataclass(frozen=True)
class ClusterFile:
    name: str
    etcd: tuple[str, ...]
    etcd_tls: str | None
    lease: int

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "etcd": list(self.etcd),
                           "etcd_tls": self.etcd_tls, "lease": self.lease}) + "\n"  # fmt: skip


def load(data_dir: Path) -> ClusterFile | None:
    path = data_dir / FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return ClusterFile(name=str(data["name"]), etcd=tuple(str(u) for u in data["etcd"]),
                           etcd_tls=data.get("etcd_tls"),
                           lease=int(data.get("lease", 0)))  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}; remove it to leave the cluster") from exc


def save(data_dir: Path, record: ClusterFile) -> None:
    path = data_dir / FILE
    temp = path.with_suffix(".json.tmp")
    with os_errors(f"cannot write {path}"):
        temp.write_text(record.to_json())
    fsync_file(temp)
    with os_errors(f"cannot write {path}"):
        temp.replace(path)
    fsync_dir(data_dir)


def remove(data_dir: Path) -> None:
    path = data_dir / FILE
    with os_errors(f"cannot remove {path}"):
        path.unlink(missing_ok=True)
    fsync_dir(data_dir)
