"""Operations on a real two-host lab: ``ferry doctor``, JSON agent logs across a move.

One lab for the module (agents log JSON, ``FERRY_LOG_FORMAT=json`` as a
systemd unit's environment would set it); one small guest for the move.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ferry.adapters import netdev

from ..conftest import LabEnv, lab_session, seqs


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, guest_cache: Path) -> Iterator[LabEnv]:
    old = os.environ.get("FERRY_LOG_FORMAT")
    os.environ["FERRY_LOG_FORMAT"] = "json"  # the lab's agents inherit it
    try:
        with lab_session(tmp_path_factory.mktemp("ops")) as lab_env:
            lab_env.lab.up(2)
            yield lab_env
    finally:
        if old is None:
            os.environ.pop("FERRY_LOG_FORMAT", None)
        else:
            os.environ["FERRY_LOG_FORMAT"] = old


def _doctor(env: LabEnv, *args: str) -> tuple[int, dict[tuple[str, str], dict[str, Any]]]:
    result = env.cli("doctor", "--json", *args, check=False)
    doc = json.loads(result.stdout)
    return result.returncode, {(c["host"], c["name"]): c for c in doc["checks"]}


def _short_lived(env: LabEnv, host: str, days: int) -> bytes:
    """host's certificate as it is, but expiring in ``days`` (same key, signed by the lab CA)."""
    tls = env.lab.root / "hosts" / host / "tls"
    cert = x509.load_pem_x509_certificate((tls / "server-cert.pem").read_bytes())
    ca_key = serialization.load_pem_private_key(
        (env.lab.ca_dir / "ca-key.pem").read_bytes(), password=None
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(dt.datetime.now(dt.UTC) + dt.timedelta(days=days))
    )
    for ext in cert.extensions:
        builder = builder.add_extension(ext.value, critical=ext.critical)
    signed = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    return signed.public_bytes(serialization.Encoding.PEM)


def test_doctor_on_a_healthy_lab_and_when_checks_fail(env: LabEnv) -> None:
    code, checks = _doctor(env)
    assert code == 0, checks
    for host in ("host-1", "host-2"):
        for name in ("qemu", "qemu_features", "cert_host", "cert_ca", "space:data_dir",
                     "network:lab", "clock", "kvm"):  # fmt: skip
            assert checks[(host, name)]["status"] == "ok", checks[(host, name)]
        assert "7.2" in checks[(host, "qemu")]["detail"]
    assert checks[("client", "cert_admin")]["status"] == "ok"
    text = env.cli("doctor", "--host", "host-1").stdout.splitlines()
    assert any(line.startswith("ok   host-1 qemu_features: all") for line in text), text
    assert not any("host-2" in line for line in text)

    # A host network whose bridge went away: fail, with the remedy, and a non-zero exit.
    netdev.add_bridge("fldoc0", env.lab.netns)
    env.cli("host", "network", "add", "gone", "--bridge", "fldoc0", "--netns", env.lab.netns,
            "--host", "host-2")  # fmt: skip
    netdev.delete("fldoc0", env.lab.netns)
    try:
        code, checks = _doctor(env)
        assert code != 0
        gone = checks[("host-2", "network:gone")]
        assert gone["status"] == "fail" and "does not exist" in gone["detail"]
        assert "ip link add fldoc0 type bridge" in gone["remedy"]
        assert ("host-1", "network:gone") not in checks
        result = env.cli("doctor", "--host", "host-2", check=False)
        assert result.returncode == 1
        line = next(x for x in result.stdout.splitlines() if "network:gone" in x)
        assert line.startswith("fail host-2 network:gone: network gone: bridge fldoc0")
        assert " -> create it" in line
    finally:
        env.cli("host", "network", "remove", "gone", "--host", "host-2")

    # A host certificate ten days from expiry: warn (the agent reads the file each time).
    cert_path = env.lab.root / "hosts" / "host-1" / "tls" / "server-cert.pem"
    original = cert_path.read_bytes()
    cert_path.write_bytes(_short_lived(env, "host-1", 10))
    try:
        code, checks = _doctor(env)
        assert code == 0  # a warning is not a failure
        host_cert = checks[("host-1", "cert_host")]
        assert host_cert["status"] == "warn" and "expires in 9 days" in host_cert["detail"]
        assert "ferry pki" in host_cert["remedy"]
        assert checks[("host-2", "cert_host")]["status"] == "ok"
    finally:
        cert_path.write_bytes(original)


def _events(env: LabEnv, host: str) -> list[dict[str, Any]]:
    lines = (env.lab.root / "hosts" / host / "agent.log").read_text().splitlines()
    events = []
    for number, line in enumerate(lines, 1):
        try:
            events.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"{host} agent.log line {number} is not JSON: {line!r}") from None
    return events


def test_one_move_followed_across_both_hosts_json_logs(env: LabEnv) -> None:
    env.cli("vm", "create", "tracked", "--host", "host-1", "--guest", "test", "--memory", "128M",
            "--disk", "32M", "--start")  # fmt: skip
    env.wait_console("tracked", lambda t: len(seqs(t)) >= 1)
    uuid = env.vm("tracked")["uuid"]
    env.cli("vm", "move", "tracked", "--to", "host-2")
    assert env.vm("tracked")["host"] == "host-2"
    source = [e for e in _events(env, "host-1") if e.get("kind") == "move"]
    jobs = {e["job"] for e in source}
    assert len(jobs) == 1, source
    (job,) = jobs
    assert all(e["vm"] == "tracked" and e["vm_uuid"] == uuid and e["peer"] == "host-2"
               and e["host"] == "host-1" for e in source)  # fmt: skip
    # The source logs the move from its first phase to its last.
    assert source[0]["msg"] == f"move {job}: preparing" and source[-1]["msg"] == f"move {job}: done"
    arriving = [e for e in _events(env, "host-2") if e.get("job") == job]
    assert arriving, "the destination logged nothing with the move's job id"
    assert all(e["vm"] == "tracked" and e["kind"] == "incoming" and e["peer"] == "host-1"
               for e in arriving)  # fmt: skip
    assert any(e["msg"] == "arrived from host-1; running here" for e in arriving), arriving
    # Lines of the VM's own logger (its state changes) carry it too, on both hosts.
    for host in ("host-1", "host-2"):
        assert any(e.get("vm_uuid") == uuid and "state" in e["msg"]
                   for e in _events(env, host)), host  # fmt: skip
    env.cli("vm", "delete", "tracked", "--force")
