"""QEMU's own TLS (GnuTLS) takes the directories ferry.adapters.pki writes.

Two facts are checked against the real binaries: that ``tls-creds-x509``
loads a host dir as server and as client, and that ``authz-simple`` matches
the client DN exactly as :func:`ferry.adapters.pki.qemu_dn` renders it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.adapters import pki

pytestmark = pytest.mark.integration

QEMU = "qemu-system-x86_64"
TIMEOUT = 30


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ca = tmp_path_factory.mktemp("ca")
    pki.create_ca(ca)
    return ca


@pytest.fixture(scope="module")
def hosta(ca_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hosta")
    pki.issue_host_cert(ca_dir, out, "hosta", ips=["127.0.0.1"])
    return out


@pytest.fixture(scope="module")
def hostb(ca_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hostb")
    pki.issue_host_cert(ca_dir, out, "hostb")
    return out


def _qemu_with_creds(*objects: str) -> subprocess.CompletedProcess[str]:
    """Start a machine-less QEMU with ``objects``, say hello over QMP, quit."""
    args = [QEMU, "-nodefaults", "-machine", "none", "-display", "none", "-qmp", "stdio"]
    for obj in objects:
        args += ["-object", obj]
    qmp = '{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n'
    proc = subprocess.Popen(
        args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(qmp, timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def test_qemu_loads_host_dir_as_server_and_client(hosta: Path) -> None:
    _need(QEMU)

    result = _qemu_with_creds(
        f"tls-creds-x509,id=tls-in,dir={hosta},endpoint=server,verify-peer=on",
        f"tls-creds-x509,id=tls-out,dir={hosta},endpoint=client",
    )

    assert result.returncode == 0, result.stderr
    replies = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert [r for r in replies if "return" in r] == [{"return": {}}, {"return": {}}]


def test_qemu_refuses_host_dir_with_a_foreign_ca(hosta: Path, tmp_path: Path) -> None:
    # Shows the test above is not vacuous: QEMU does check the chain at load.
    _need(QEMU)
    pki.create_ca(tmp_path / "other-ca")
    mixed = tmp_path / "mixed"
    shutil.copytree(hosta, mixed)
    shutil.copy(tmp_path / "other-ca" / "ca-cert.pem", mixed / "ca-cert.pem")

    result = _qemu_with_creds(f"tls-creds-x509,id=tls-in,dir={mixed},endpoint=server")

    assert result.returncode != 0
    assert "server-cert.pem" in result.stderr


@pytest.fixture
def nbd_server(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A work dir and a 1 MiB raw image for :func:`_serve`.

    Yields ``(work dir, image)``; a qemu-nbd started by :func:`_serve` leaves
    its pid file in the work dir and is killed by that pid here.
    """
    image = tmp_path / "disk.raw"
    with image.open("wb") as fh:
        fh.truncate(1 << 20)
    yield tmp_path, image
    for pidfile in tmp_path.glob("*.pid"):
        pid = int(pidfile.read_text())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _serve(server_dir: Path, image: Path, workdir: Path, identity: str) -> Path:
    """Start qemu-nbd on a unix socket, TLS with ``identity`` as the only allowed DN."""
    sock = workdir / "nbd.sock"
    result = subprocess.run(
        [
            "qemu-nbd", "--fork", f"--pid-file={workdir / 'nbd.pid'}", "--persistent",
            f"--socket={sock}", "--format=raw",
            "--object", f"tls-creds-x509,id=tls-in,dir={server_dir},endpoint=server,verify-peer=on",
            # authz-simple's identity sits in a -object list: commas doubled.
            "--object", f"authz-simple,id=authz0,identity={identity.replace(',', ',,')}",
            "--tls-creds=tls-in", "--tls-authz=authz0", str(image),
        ],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return sock


def _open_over_nbd(client_dir: Path, sock: Path, hostname: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "qemu-img", "info", "--output=json",
            "--object", f"tls-creds-x509,id=tls-out,dir={client_dir},endpoint=client",
            "--image-opts",
            f"driver=nbd,server.type=unix,server.path={sock},tls-creds=tls-out,"
            f"tls-hostname={hostname}",
        ],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip


def test_authz_accepts_the_qemu_dn(hosta: Path, hostb: Path, nbd_server: tuple[Path, Path]) -> None:
    _need("qemu-nbd", "qemu-img")
    workdir, image = nbd_server
    client = pki.load_cert_info(hostb / "client-cert.pem")
    sock = _serve(hosta, image, workdir, pki.qemu_dn(client))

    result = _open_over_nbd(hostb, sock, "hosta")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["virtual-size"] == 1 << 20


def test_authz_refuses_the_rfc4514_order(
    hosta: Path, hostb: Path, nbd_server: tuple[Path, Path]
) -> None:
    # The same DN most specific first (CertInfo.subject) is not what QEMU sees.
    _need("qemu-nbd", "qemu-img")
    workdir, image = nbd_server
    client = pki.load_cert_info(hostb / "client-cert.pem")
    assert client.subject == "CN=hostb,OU=hosts,O=ferry"
    sock = _serve(hosta, image, workdir, client.subject)

    result = _open_over_nbd(hostb, sock, "hosta")

    assert result.returncode != 0
