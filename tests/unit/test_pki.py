"""ferry.adapters.pki: real keys, real files, real TLS handshakes on loopback."""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from ferry.adapters import pki
from ferry.adapters.pki import CertInfo, Role
from ferry.errors import InvalidInputError, PkiError

HOST_FILES = {
    "ca-cert.pem",
    "server-cert.pem",
    "server-key.pem",
    "client-cert.pem",
    "client-key.pem",
}
ADMIN_FILES = {"ca-cert.pem", "client-cert.pem", "client-key.pem"}


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ca = tmp_path_factory.mktemp("ca")
    pki.create_ca(ca)
    return ca


@pytest.fixture(scope="module")
def other_ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ca = tmp_path_factory.mktemp("other-ca")
    pki.create_ca(ca, "elsewhere-ca")
    return ca


@pytest.fixture(scope="module")
def hosta(ca_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hosta")
    pki.issue_host_cert(
        ca_dir, out, "hosta", dns_names=["hosta.lab.internal"], ips=["127.0.0.1", "::1"]
    )
    return out


@pytest.fixture(scope="module")
def hostb(ca_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hostb")
    pki.issue_host_cert(ca_dir, out, "hostb")
    return out


@pytest.fixture(scope="module")
def admin(ca_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("admin")
    pki.issue_admin_cert(ca_dir, out, "alice")
    return out


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _ekus(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


# -- the CA -------------------------------------------------------------------


def test_create_ca_writes_a_self_signed_ca(tmp_path: Path) -> None:
    path = pki.create_ca(tmp_path / "ca")

    assert path == tmp_path / "ca" / "ca-cert.pem"
    cert = _cert(path)
    assert cert.subject.rfc4514_string() == "CN=ferry-ca,O=ferry"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    cert.verify_directly_issued_by(cert)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3649) < lifetime < dt.timedelta(days=3651)
    assert _mode(tmp_path / "ca" / "ca-key.pem") == 0o600


def test_create_ca_refuses_to_overwrite(tmp_path: Path) -> None:
    pki.create_ca(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    with pytest.raises(PkiError, match="already exists"):
        pki.create_ca(tmp_path, "another")

    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_issuing_without_a_ca_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match=r"ca-cert\.pem does not exist"):
        pki.issue_host_cert(tmp_path / "no-ca", tmp_path / "out", "hosta")


def test_ca_key_that_does_not_match_its_cert_is_refused(tmp_path: Path, other_ca_dir: Path) -> None:
    pki.create_ca(tmp_path / "ca")
    shutil.copy(other_ca_dir / "ca-key.pem", tmp_path / "ca" / "ca-key.pem")

    with pytest.raises(PkiError, match="does not belong"):
        pki.issue_admin_cert(tmp_path / "ca", tmp_path / "out")


# -- host and admin certificates ----------------------------------------------


def test_host_cert_is_a_server_and_client_cert_signed_by_the_ca(ca_dir: Path, hosta: Path) -> None:
    cert = _cert(hosta / "server-cert.pem")
    ca = _cert(ca_dir / "ca-cert.pem")

    cert.verify_directly_issued_by(ca)
    assert cert.subject.rfc4514_string() == "CN=hosta,OU=hosts,O=ferry"
    assert _ekus(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and not usage.key_cert_sign
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hosta", "hosta.lab.internal"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=729) < lifetime < dt.timedelta(days=731)


def test_host_cert_info(hosta: Path) -> None:
    info = pki.load_cert_info(hosta / "server-cert.pem")

    assert info.subject == "CN=hosta,OU=hosts,O=ferry"
    assert info.common_name == "hosta"
    assert info.role is Role.HOST
    assert info.dns_names == ("hosta", "hosta.lab.internal")
    assert info.ips == ("127.0.0.1", "::1")
    assert info.not_after.tzinfo is not None
    assert info.not_after > dt.datetime.now(dt.UTC) + dt.timedelta(days=700)


def test_host_dir_serves_qemu_as_server_and_client(ca_dir: Path, hosta: Path) -> None:
    assert {p.name for p in hosta.iterdir()} == HOST_FILES
    assert (hosta / "ca-cert.pem").read_bytes() == (ca_dir / "ca-cert.pem").read_bytes()
    assert (hosta / "client-cert.pem").read_bytes() == (hosta / "server-cert.pem").read_bytes()
    assert (hosta / "client-key.pem").read_bytes() == (hosta / "server-key.pem").read_bytes()
    assert _mode(hosta / "server-key.pem") == 0o600
    assert _mode(hosta / "client-key.pem") == 0o600


def test_host_name_is_a_san_once_even_if_repeated(ca_dir: Path, tmp_path: Path) -> None:
    info = pki.issue_host_cert(ca_dir, tmp_path, "hostc", dns_names=["hostc", "c.lab"])

    assert info.dns_names == ("hostc", "c.lab")
    assert info.ips == ()


def test_reissuing_replaces_key_and_cert(ca_dir: Path, tmp_path: Path) -> None:
    first = pki.issue_host_cert(ca_dir, tmp_path, "hostd")
    old_key = (tmp_path / "server-key.pem").read_bytes()
    second = pki.issue_host_cert(ca_dir, tmp_path, "hostd")

    assert first.thumbprint != second.thumbprint
    assert (tmp_path / "server-key.pem").read_bytes() != old_key
    assert pki.thumbprint(tmp_path / "client-cert.pem") == second.thumbprint
    assert {p.name for p in tmp_path.iterdir()} == HOST_FILES


def test_serial_numbers_are_random(ca_dir: Path, tmp_path: Path) -> None:
    serials = set()
    for i in range(3):
        pki.issue_host_cert(ca_dir, tmp_path / f"h{i}", "hoste")
        serials.add(_cert(tmp_path / f"h{i}" / "server-cert.pem").serial_number)

    assert len(serials) == 3
    assert all(s.bit_length() > 64 for s in serials)


def test_admin_cert_is_client_only(ca_dir: Path, admin: Path) -> None:
    cert = _cert(admin / "client-cert.pem")
    info = pki.load_cert_info(admin / "client-cert.pem")

    cert.verify_directly_issued_by(_cert(ca_dir / "ca-cert.pem"))
    assert _ekus(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert info.role is Role.ADMIN
    assert info.common_name == "alice"
    assert info.subject == "CN=alice,OU=admins,O=ferry"
    assert info.dns_names == () and info.ips == ()
    assert {p.name for p in admin.iterdir()} == ADMIN_FILES
    assert _mode(admin / "client-key.pem") == 0o600


def test_ca_cert_has_no_role(ca_dir: Path) -> None:
    info = pki.load_cert_info(ca_dir / "ca-cert.pem")

    assert info.role is None
    assert info.common_name == "ferry-ca"


# -- thumbprints and DER ------------------------------------------------------


def test_thumbprint_is_sha256_of_the_der(hosta: Path) -> None:
    pem = (hosta / "server-cert.pem").read_text()
    expected = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()

    assert pki.thumbprint(hosta / "server-cert.pem") == expected


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl tool")
def test_thumbprint_matches_openssl_fingerprint(hosta: Path) -> None:
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", hosta / "server-cert.pem"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    fingerprint = out.strip().split("=", 1)[1].replace(":", "").lower()

    assert pki.thumbprint(hosta / "server-cert.pem") == fingerprint


def test_cert_info_from_der_equals_load_cert_info(hosta: Path) -> None:
    der = ssl.PEM_cert_to_DER_cert((hosta / "server-cert.pem").read_text())

    assert pki.cert_info_from_der(der) == pki.load_cert_info(hosta / "server-cert.pem")


def test_unreadable_certificates_are_pki_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")

    with pytest.raises(PkiError, match=r"junk\.pem"):
        pki.load_cert_info(junk)
    with pytest.raises(PkiError, match="does not exist"):
        pki.thumbprint(tmp_path / "missing.pem")
    with pytest.raises(PkiError):
        pki.cert_info_from_der(b"\x30\x03\x02\x01\x00")


# -- QEMU's view of the subject ----------------------------------------------


def test_qemu_dn_is_most_significant_first(hosta: Path, admin: Path) -> None:
    assert pki.qemu_dn(pki.load_cert_info(hosta / "client-cert.pem")) == "O=ferry,OU=hosts,CN=hosta"
    assert (
        pki.qemu_dn(pki.load_cert_info(admin / "client-cert.pem")) == "O=ferry,OU=admins,CN=alice"
    )


def test_qemu_dn_keeps_escaped_commas_inside_their_rdn() -> None:
    info = CertInfo(
        subject=r"CN=a\,b,OU=x\\,O=ferry",
        common_name="a,b",
        role=None,
        thumbprint="00",
        not_after=dt.datetime.now(dt.UTC),
        dns_names=(),
        ips=(),
    )

    assert pki.qemu_dn(info) == r"O=ferry,OU=x\\,CN=a\,b"


# -- validation ----------------------------------------------------------------

BAD_NAMES = ["", "HostA", "-hosta", ".hosta", "host_a", "host a", "hosta\n", "a" * 64, "höst"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_host_names_are_refused(ca_dir: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidInputError, match="invalid host name"):
        pki.issue_host_cert(ca_dir, tmp_path / "out", name)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_admin_names_are_refused(ca_dir: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidInputError, match="invalid admin name"):
        pki.issue_admin_cert(ca_dir, tmp_path / "out", name)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ip", ["1.2.3", "256.1.1.1", "hosta", "", "10.0.0.1/24", "::g"])
def test_bad_ips_are_refused(ca_dir: Path, tmp_path: Path, ip: str) -> None:
    with pytest.raises(InvalidInputError, match="invalid IP address"):
        pki.issue_host_cert(ca_dir, tmp_path / "out", "hosta", ips=[ip])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dns", ["", "Upper.lab", "a..b", "-a.lab", "a-.lab", "*.lab", "a b"])
def test_bad_extra_dns_names_are_refused(ca_dir: Path, tmp_path: Path, dns: str) -> None:
    with pytest.raises(InvalidInputError, match="invalid DNS name"):
        pki.issue_host_cert(ca_dir, tmp_path / "out", "hosta", dns_names=[dns])


def test_names_at_the_limits_are_accepted(ca_dir: Path, tmp_path: Path) -> None:
    longest = "0" + "a" * 62
    info = pki.issue_host_cert(ca_dir, tmp_path / "h", longest, ips=["fe80::1"])

    assert info.common_name == longest
    assert pki.issue_admin_cert(ca_dir, tmp_path / "a", "ops.team-1").common_name == "ops.team-1"


def test_bad_ca_names_are_refused(tmp_path: Path) -> None:
    for name in ("", "x" * 65, "tab\there"):
        with pytest.raises(InvalidInputError, match="invalid CA name"):
            pki.create_ca(tmp_path, name)
    assert not any(tmp_path.iterdir())


# -- SSL contexts ----------------------------------------------------------------


def test_contexts_require_tls12_and_peer_certificates(hosta: Path) -> None:
    server = pki.server_ssl_context(hosta)
    client = pki.client_ssl_context(hosta)

    for ctx in (server, client):
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        # Only the ferry CA is trusted, never the system store.
        assert [c["subject"] for c in ctx.get_ca_certs()] == [
            ((("organizationName", "ferry"),), (("commonName", "ferry-ca"),))
        ]
    assert client.check_hostname


def test_server_context_names_the_missing_file(admin: Path) -> None:
    with pytest.raises(PkiError, match=r"server-cert\.pem does not exist"):
        pki.server_ssl_context(admin)


def test_client_context_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match=r"ca-cert\.pem does not exist"):
        pki.client_ssl_context(tmp_path)


def test_mismatched_key_is_a_pki_error(tmp_path: Path, hosta: Path, hostb: Path) -> None:
    for f in hosta.iterdir():
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(hostb / "client-key.pem", tmp_path / "client-key.pem")

    with pytest.raises(PkiError, match=r"client-cert\.pem with .*client-key\.pem"):
        pki.client_ssl_context(tmp_path)


# -- real handshakes ---------------------------------------------------------------


@dataclass
class Outcome:
    peer_der: bytes | None = None
    error: Exception | None = None


def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str
) -> tuple[Outcome, Outcome]:
    """Run one TLS connection on loopback; return what each side saw."""
    server, client = Outcome(), Outcome()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(10)
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    server.peer_der = tls.getpeercert(binary_form=True)
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError) as exc:
                server.error = exc

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=10) as raw,
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                client.peer_der = tls.getpeercert(binary_form=True)
                # Under TLS 1.3 the server judges the client's certificate
                # after the client's handshake returns; its verdict shows here.
                if tls.recv(2) != b"ok":
                    raise ConnectionError("server closed without answering")
        except (ssl.SSLError, OSError) as exc:
            client.error = exc
        finally:
            thread.join(timeout=15)
    assert not thread.is_alive()
    return server, client


def test_handshake_between_two_hosts(hosta: Path, hostb: Path) -> None:
    server, client = _handshake(
        pki.server_ssl_context(hosta), pki.client_ssl_context(hostb), "hosta"
    )

    assert server.error is None and client.error is None
    assert server.peer_der is not None and client.peer_der is not None
    peer = pki.cert_info_from_der(server.peer_der)
    assert (peer.common_name, peer.role) == ("hostb", Role.HOST)
    assert peer.thumbprint == pki.thumbprint(hostb / "client-cert.pem")
    assert pki.cert_info_from_der(client.peer_der).common_name == "hosta"


def test_handshake_by_ip_address(hosta: Path, hostb: Path) -> None:
    server, client = _handshake(
        pki.server_ssl_context(hosta), pki.client_ssl_context(hostb), "127.0.0.1"
    )

    assert server.error is None and client.error is None


def test_handshake_from_admin(hosta: Path, admin: Path) -> None:
    server, client = _handshake(
        pki.server_ssl_context(hosta), pki.client_ssl_context(admin), "hosta"
    )

    assert client.error is None
    assert server.peer_der is not None
    peer = pki.cert_info_from_der(server.peer_der)
    assert (peer.common_name, peer.role) == ("alice", Role.ADMIN)


def test_server_refuses_client_from_another_ca(
    hosta: Path, other_ca_dir: Path, tmp_path: Path
) -> None:
    pki.issue_host_cert(other_ca_dir, tmp_path, "hostb")
    # The stranger trusts our CA, so only the server's check can stop it.
    shutil.copy(hosta / "ca-cert.pem", tmp_path / "ca-cert.pem")

    server, client = _handshake(
        pki.server_ssl_context(hosta), pki.client_ssl_context(tmp_path), "hosta"
    )

    assert isinstance(server.error, ssl.SSLCertVerificationError)
    assert server.peer_der is None
    assert client.error is not None


def test_client_refuses_server_from_another_ca(
    hostb: Path, other_ca_dir: Path, tmp_path: Path
) -> None:
    pki.issue_host_cert(other_ca_dir, tmp_path, "hosta")
    shutil.copy(hostb / "ca-cert.pem", tmp_path / "ca-cert.pem")

    server, client = _handshake(
        pki.server_ssl_context(tmp_path), pki.client_ssl_context(hostb), "hosta"
    )

    assert isinstance(client.error, ssl.SSLCertVerificationError)
    assert server.error is not None


def test_client_refuses_wrong_host_name(hosta: Path, hostb: Path) -> None:
    _, client = _handshake(pki.server_ssl_context(hosta), pki.client_ssl_context(hostb), "hostz")

    assert isinstance(client.error, ssl.SSLCertVerificationError)
    assert "hostz" in str(client.error)


def test_server_refuses_client_without_certificate(hosta: Path) -> None:
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.load_verify_locations(cafile=hosta / "ca-cert.pem")

    server, client = _handshake(pki.server_ssl_context(hosta), anonymous, "hosta")

    assert isinstance(server.error, ssl.SSLError)
    assert "certificate" in str(server.error).lower()
    assert client.error is not None
