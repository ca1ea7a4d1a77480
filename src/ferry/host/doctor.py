"""The agent's half of ``ferry doctor``: gather this host's facts and judge them.

What QEMU supports is asked of a throwaway ``qemu-system-x86_64 -machine none``
(no guest, no disk) over QMP, once per QEMU version per agent; the verdicts
are :mod:`ferry.core.doctor`'s. The clock check needs more than one host, so
the agent only reports its time and the client compares.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.adapters.pki import CA_CERT, SERVER_CERT, load_cert_info
from ferry.core import doctor
from ferry.core.doctor import Check
from ferry.core.versions import machine_type
from ferry.errors import FerryError, QemuError
from ferry.host import facts
from ferry.host.cluster.membership import ClusterContext
from ferry.host.cluster.volumes import VolumeService
from ferry.host.config import HostConfig
from ferry.host.networks import HostNetworks
from ferry.host.replication.server import ReplicaServer

log = logging.getLogger(__name__)

ETCD_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class QemuFeatures:
    """What a QEMU binary offers: QMP commands, migration capabilities, machine types."""

    commands: frozenset[str]
    capabilities: frozenset[str]
    machine_types: frozenset[str]


async def probe_qemu_features(qemu_binary: str) -> QemuFeatures:
    """Ask a QEMU that runs no guest what it supports (``-machine none``, paused)."""
    async with facts.bare_qemu(qemu_binary, name="doctor") as channel:
        commands = await channel.execute("query-commands")
        caps = await channel.execute("query-migrate-capabilities")
        machines = await channel.execute("query-machines")
    try:
        return QemuFeatures(
            commands=frozenset(str(c["name"]) for c in commands),
            capabilities=frozenset(str(c["capability"]) for c in caps),
            machine_types=frozenset(str(m["name"]) for m in machines),
        )
    except (TypeError, KeyError) as exc:
        raise QemuError(f"QEMU answered its feature queries in an unknown shape: {exc}") from exc


def _free_space(path: Path) -> tuple[int, int]:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


class HostDoctor:
    """This host's checks (everything but the clock comparison)."""

    def __init__(
        self,
        config: HostConfig,
        *,
        accelerator: str,
        qemu_version: str,
        networks: HostNetworks,
        replica_server: ReplicaServer,
        cluster: ClusterContext,
        volumes: VolumeService,
    ) -> None:
        self.config = config
        self.accelerator = accelerator
        self.qemu_version = qemu_version
        self.networks = networks
        self.replica_server = replica_server
        self.cluster = cluster
        self.volumes = volumes
        self._features: dict[str, QemuFeatures] = {}  # by QEMU version

    async def report(self) -> dict[str, Any]:
        """``{"host", "received", "time", "checks": [...]}``: this host's clock for the client.

        ``received`` is when the request came, ``time`` when the answer goes.
        """
        received = time.time()
        checks = [*await self._qemu(), self._kvm(), *self._certs(), *await self._space(),
                  *await self._bridges(), *await self._etcd()]  # fmt: skip
        checks = [Check(c.name, c.status, c.detail, c.remedy, self.config.name) for c in checks]
        return {"host": self.config.name, "received": received, "time": time.time(),
                "checks": [c.to_json() for c in checks]}  # fmt: skip

    async def _qemu(self) -> list[Check]:
        # The binary may have been upgraded under the running agent: ask again.
        try:
            version = await asyncio.to_thread(facts.qemu_version, self.config.qemu_binary)
        except FerryError as exc:
            return [doctor.qemu_features_check(None, None, error=str(exc))]
        try:
            features = self._features.get(version)
            if features is None:
                features = await probe_qemu_features(self.config.qemu_binary)
                self._features = {version: features}
        except FerryError as exc:
            return [doctor.qemu_version_check(version, machine_type=self._machine(),
                                              machine_types=None),
                    doctor.qemu_features_check(None, None, error=str(exc))]  # fmt: skip
        return [doctor.qemu_version_check(version, machine_type=self._machine(),
                                          machine_types=sorted(features.machine_types)),
                doctor.qemu_features_check(features.commands, features.capabilities)]  # fmt: skip

    def _machine(self) -> str:
        return machine_type(self.config.functional_level)

    def _kvm(self) -> Check:
        probe: str | None = None
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            cached = json.loads((self.config.data_dir / facts.PROBE_FILE).read_text())
            probe = str(cached["accelerator"])
        return doctor.kvm_check(configured=self.config.accelerator, accelerator=self.accelerator,
                                dev_kvm=facts.kvm_usable(), probe=probe)  # fmt: skip

    def _certs(self) -> list[Check]:
        now = dt.datetime.now(dt.UTC)
        tls = self.config.tls_dir
        checks = []
        for name, what, file, remedy in [
            ("cert_host", "host certificate", SERVER_CERT,
             f"issue a new one ('ferry pki renew' or 'ferry pki host {self.config.name}') "
             f"into {tls} and restart the agent"),
            ("cert_ca", "CA certificate", CA_CERT,
             "make a new CA and re-issue every host's and admin's certificate from it"),
        ]:  # fmt: skip
            try:
                info = load_cert_info(tls / file)
            except FerryError as exc:
                checks.append(doctor.cert_check(name, what, None, now, remedy=remedy,
                                                error=str(exc)))  # fmt: skip
            else:
                checks.append(doctor.cert_check(name, what, info.not_after, now, remedy=remedy))
        return checks

    async def _space(self) -> list[Check]:
        places: list[tuple[str, str, str]] = [("space:data_dir", "data dir",
                                               str(self.config.data_dir))]  # fmt: skip
        settings = self.replica_server.settings()
        if settings.enabled and settings.storage:
            dirs = dict.fromkeys([settings.storage, *(e.storage for e in settings.allow
                                                      if e.storage)])  # fmt: skip
            places += [("space:replica_storage", "replica storage", d) for d in dirs]
        membership = self.cluster.membership
        if membership is not None:
            try:
                records = await asyncio.wait_for(self.volumes.records(membership), ETCD_TIMEOUT_S)
            except (FerryError, TimeoutError) as exc:
                log.info("doctor: cannot list cluster volumes: %s", exc)
                records = []  # the etcd check says why
            places += [(f"space:volume:{r.name}", f"cluster volume {r.name}", r.path)
                       for r in records]  # fmt: skip
        checks = []
        for name, what, path in places:
            try:
                free, total = await asyncio.to_thread(_free_space, Path(path))
            except OSError as exc:
                checks.append(doctor.space_check(name, what, path, None, None,
                                                 error=exc.strerror or str(exc)))  # fmt: skip
            else:
                checks.append(doctor.space_check(name, what, path, free, total))
        return checks

    async def _bridges(self) -> list[Check]:
        return [doctor.bridge_check(str(v["name"]), str(v["bridge"]),
                                    str(v["netns"]) if v.get("netns") else None,
                                    bool(v["exists"]))
                for v in await self.networks.views()]  # fmt: skip

    async def _etcd(self) -> list[Check]:
        membership = self.cluster.membership
        if membership is None:
            return []
        started = time.monotonic()
        try:
            await asyncio.wait_for(membership.store.revision(), ETCD_TIMEOUT_S)
        except TimeoutError:
            error: str | None = f"no answer within {ETCD_TIMEOUT_S:.0f}s"
        except FerryError as exc:
            error = str(exc)
        else:
            error = None
        return [doctor.etcd_check(membership.cluster, error=error,
                                  latency_s=time.monotonic() - started)]  # fmt: skip
