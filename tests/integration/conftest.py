"""Fixtures for tests that drive QEMU or etcd directly (adapters, no agent).

``guest_spec``: the test guest on a disk. ``etcd``: one real etcd member on
loopback with mutual TLS for a test module, and a client TLS dir of its CA.
``cluster_lab_env``: a lab of three agents that form cluster ``c1`` (the lab's
etcd, volume ``csv1``, lease TTL 4 s), checked for leftovers when it goes.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from ferry.adapters import pki, qemu
from ferry.adapters.etcd_server import EtcdServer
from ferry.core.spec import DiskSpec, RunContext, VmSpec, qemu_argv
from ferry.guest.build import ensure_guest
from tests.conftest import LabEnv, lab_session

DISK_SIZE = 32 * 1024**2


@asynccontextmanager
async def running_guest(spec: VmSpec, work: Path) -> AsyncIterator[qemu.QmpChannel]:
    ctx = RunContext(qemu_binary="qemu-system-x86_64", accelerator="tcg",
                     pidfile=work / "qemu.pid", qmp_socket=work / "qmp.sock",
                     serial_log=work / "serial.log")  # fmt: skip
    pid = await qemu.launch(qemu_argv(spec, ctx), pidfile=ctx.pidfile, uuid=spec.uuid)
    channel = qemu.QmpChannel(ctx.qmp_socket, name=spec.name)
    try:
        await channel.connect()
        yield channel
    finally:
        await channel.close()
        await qemu.kill_process(pid, spec.uuid)


async def wait_log(work: Path, done: Callable[[str], bool], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = (
            (work / "serial.log").read_text(errors="replace")
            if (work / "serial.log").exists()
            else ""
        )
        if done(text):
            return text
        assert time.monotonic() < deadline, f"console never matched: {text[-500:]}"
        await asyncio.sleep(0.2)


def same_image(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)],
                          capture_output=True).returncode == 0  # fmt: skip


@pytest.fixture
def guest_spec(tmp_path: Path, guest_cache: Path) -> VmSpec:
    guest = ensure_guest(guest_cache)
    disk = tmp_path / "disk0.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(DISK_SIZE)],
                   check=True)  # fmt: skip
    return VmSpec(
        name="cbt",
        config_version=3,
        memory=128 * 1024**2,
        disks=(DiskSpec(path=str(disk), size=DISK_SIZE),),
        kernel=str(guest.kernel),
        initrd=str(guest.initrd),
        append=guest.append,
    )


@dataclass(frozen=True)
class EtcdEnv:
    server: EtcdServer
    url: str
    client_tls: Path  # ca-cert.pem client-cert.pem client-key.pem of the server's CA
    ca_dir: Path


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdEnv]:
    """A running etcd member (TLS, client certificates required); stopped by pid afterwards."""
    root = tmp_path_factory.mktemp("etcd")
    pki.create_ca(root / "ca", name="ferry-test-ca")
    pki.issue_host_cert(root / "ca", root / "client", "etcd-client")
    server = EtcdServer(root / "etcd", root / "ca")
    try:
        server.start()
        yield EtcdEnv(server, server.url, root / "client", root / "ca")
    finally:
        server.stop()
        left = _processes_naming(root)
        assert not left, f"etcd processes left running: {left}"


def _processes_naming(path: Path) -> list[int]:
    marker = str(path).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


CLUSTER = "c1"
CLUSTER_LEASE_TTL_S = 4
CLUSTER_SETTLE_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def cluster_lab_env(
    tmp_path_factory: pytest.TempPathFactory, guest_cache: Path, request: pytest.FixtureRequest
) -> Iterator[LabEnv]:
    """Lab hosts host-1..3 with agents, the lab's etcd, cluster c1 of all three
    (volume csv1 on ``<lab>/clusters/c1/csv1``, ``cluster_lease_ttl`` 4 s in each
    host.toml), a leader elected and every node up. Torn down by ``lab down``,
    then checked: no agent, QEMU, fence guard or etcd of the lab is left.

    A test module that sets ``CLUSTER_LAB_STANDALONE = N`` also gets host-4..
    as plain hosts outside the cluster (e.g. a replica server)."""
    with lab_session(tmp_path_factory.mktemp("lab")) as env:
        standalone = int(getattr(request.module, "CLUSTER_LAB_STANDALONE", 0))
        nodes = ["host-1", "host-2", "host-3"] if standalone else []  # []: every host
        # Image locks off: only fencing may keep two QEMUs off one disk (one kernel here).
        env.lab.up(3 + standalone, clusters={CLUSTER: nodes}, lease_ttl_s=CLUSTER_LEASE_TTL_S,
                   host_settings={"image_locking": False})  # fmt: skip
        _wait_settled(env)
        yield env


def _wait_settled(env: LabEnv) -> None:
    deadline = time.monotonic() + CLUSTER_SETTLE_TIMEOUT_S
    view: object = None
    while time.monotonic() < deadline:
        view = env.cli.json("cluster", "show", CLUSTER)
        if (
            isinstance(view, dict)
            and view.get("leader")
            and all(n["state"] == "up" for n in view["nodes"])
        ):
            return
        time.sleep(0.3)
    raise AssertionError(f"cluster {CLUSTER} did not settle: {view}")
