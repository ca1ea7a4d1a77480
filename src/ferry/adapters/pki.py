"""Ferry's private PKI: one CA per deployment, host and admin certificates.

Every ferry connection is mutual TLS against this CA: the CLI with an admin
certificate, agents with host certificates, and QEMU with the same host
certificates for migration and NBD. This module makes the CA and the
certificates, lays them out on disk the way QEMU's ``tls-creds-x509`` reads
them, reads certificates back into :class:`CertInfo`, and builds the
``ssl.SSLContext`` objects the agent and its clients use.

Subjects (in the order of the certificate's RDN sequence)::

    CA      O=ferry, CN=<ca name>
    host    O=ferry, OU=hosts,  CN=<host>    serverAuth + clientAuth, SAN DNS/IP
    admin   O=ferry, OU=admins, CN=<admin>   clientAuth

Directory layouts::

    CA dir     ca-cert.pem  ca-key.pem (0600)
    host dir   ca-cert.pem  server-cert.pem  server-key.pem (0600)
                            client-cert.pem  client-key.pem (0600)
    admin dir  ca-cert.pem  client-cert.pem  client-key.pem (0600)

A host dir serves as-is for both ``endpoint=server`` and ``endpoint=client``:
the host certificate carries both key purposes, so the client pair is a copy
of the server pair.

All keys are RSA 2048. ECDSA P-256 would be smaller and faster, but RSA is
what every GnuTLS build behind QEMU and every OpenSSL behind Python takes
without question, and one key type keeps one code path.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import os
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ferry.errors import InvalidInputError, PkiError

log = logging.getLogger(__name__)

ORGANIZATION = "ferry"
DEFAULT_CA_NAME = "ferry-ca"

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"

CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=730)
# Backdate notBefore so a peer whose clock runs a little behind accepts a
# certificate issued a moment ago.
_CLOCK_SKEW = dt.timedelta(minutes=5)
_RSA_BITS = 2048

_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
    encipher_only=False, decipher_only=False,
)  # fmt: skip
# GnuTLS (under QEMU) wants keyEncipherment on RSA server keys.
_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=True,
    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
    encipher_only=False, decipher_only=False,
)  # fmt: skip

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")
_DNS_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DNS_RE = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")

_OU_HOSTS = "hosts"
_OU_ADMINS = "admins"


class Role(StrEnum):
    """What a certificate lets its holder do, read from its OU."""

    ADMIN = "admin"
    HOST = "host"


_ROLE_BY_OU = {_OU_HOSTS: Role.HOST, _OU_ADMINS: Role.ADMIN}


@dataclass(frozen=True)
class CertInfo:
    """The facts about one certificate that ferry decides on.

    ``subject`` is the RFC 4514 string (most specific RDN first, as
    ``cryptography`` and OpenSSL print it); :func:`qemu_dn` gives the form
    QEMU compares. ``thumbprint`` is the SHA-256 of the DER, lowercase hex
    without colons, the value pinned by replication relationships.
    """

    subject: str
    common_name: str
    role: Role | None
    thumbprint: str
    not_after: dt.datetime
    dns_names: tuple[str, ...]
    ips: tuple[str, ...]


# -- validation ---------------------------------------------------------------


def _check_name(name: str, what: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise InvalidInputError(
            f"invalid {what} name {name!r}: use 1-63 characters of a-z, 0-9, '.' and '-', "
            "starting with a letter or digit"
        )
    return name


def _check_dns_name(name: str) -> str:
    if len(name) > 253 or not _DNS_RE.fullmatch(name):
        raise InvalidInputError(
            f"invalid DNS name {name!r}: use lowercase labels of a-z, 0-9 and '-' separated by dots"
        )
    return name


def _check_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError as exc:
        raise InvalidInputError(f"invalid IP address {text!r}: {exc}") from exc


def _check_ca_name(name: str) -> str:
    # The CA name only ever appears as a CN, so any printable text that fits
    # the X.520 upper bound of 64 characters will do.
    if not 0 < len(name) <= 64 or not name.isprintable():
        raise InvalidInputError(f"invalid CA name {name!r}: use 1-64 printable characters")
    return name


# -- files --------------------------------------------------------------------


def _write_files(directory: Path, files: Mapping[str, tuple[bytes, bool]]) -> None:
    """Write ``{name: (data, private)}`` into ``directory``, all or nothing.

    Every file goes to a temporary name first and is renamed into place only
    when all are written, so a failure never leaves a new key next to an old
    certificate. Private files are created 0600 from the start.
    """
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise PkiError(f"cannot create {directory}: {exc.strerror}") from exc
    staged: list[tuple[Path, Path]] = []
    try:
        for name, (data, private) in files.items():
            final = directory / name
            tmp = directory / f".{name}.tmp"
            mode = 0o600 if private else 0o644
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            staged.append((tmp, final))
            with os.fdopen(fd, "wb") as fh:
                # The umask could only narrow the mode; make it exact anyway.
                os.fchmod(fh.fileno(), mode)
                fh.write(data)
        for tmp, final in staged:
            tmp.replace(final)
    except OSError as exc:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        where = exc.filename or directory
        raise PkiError(
            f"cannot write certificate files in {directory}: {where}: {exc.strerror}"
        ) from exc


def _read(path: Path, remedy: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise PkiError(f"{path} does not exist; {remedy}") from exc
    except OSError as exc:
        raise PkiError(f"cannot read {path}: {exc.strerror}; {remedy}") from exc


def _load_pem_cert(path: Path, remedy: str) -> x509.Certificate:
    data = _read(path, remedy)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise PkiError(f"{path} is not a PEM certificate ({exc}); {remedy}") from exc


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# -- the CA -------------------------------------------------------------------

_SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)


def create_ca(ca_dir: Path, name: str = DEFAULT_CA_NAME) -> Path:
    """Create the deployment's CA in ``ca_dir``; return the CA certificate's path.

    Refuses to replace an existing CA: every host and admin certificate of the
    deployment hangs on it.
    """
    _check_ca_name(name)
    for existing in (ca_dir / CA_CERT, ca_dir / CA_KEY):
        if existing.exists():
            raise PkiError(
                f"a CA already exists in {ca_dir} ({existing.name}); refusing to overwrite it, "
                "since every certificate of this deployment depends on it. Remove the CA "
                "dir yourself if you really mean to start over"
            )
    key = _new_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_files(ca_dir, {CA_KEY: (_pem_key(key), True), CA_CERT: (_pem_cert(cert), False)})
    log.info("created CA %r in %s", name, ca_dir)
    return ca_dir / CA_CERT


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, _SigningKey]:
    remedy = "create the CA first, or point ferry at the right CA dir"
    cert = _load_pem_cert(ca_dir / CA_CERT, remedy)
    key_path = ca_dir / CA_KEY
    data = _read(key_path, remedy)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{key_path} is not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise PkiError(f"{key_path} holds a {type(key).__name__}; ferry CAs use RSA or ECDSA")
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, pub) != cert.public_key().public_bytes(der, pub):
        raise PkiError(
            f"{key_path} does not belong to {ca_dir / CA_CERT}; restore the matching pair"
        )
    if cert.not_valid_after_utc <= dt.datetime.now(dt.UTC):
        raise PkiError(
            f"the CA in {ca_dir} expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
            "create a new CA and re-issue every certificate"
        )
    return cert, key


def _issue(
    ca_dir: Path,
    subject: x509.Name,
    usages: Sequence[x509.ObjectIdentifier],
    sans: Sequence[x509.GeneralName],
) -> tuple[x509.Certificate, rsa.RSAPrivateKey, x509.Certificate]:
    """Sign a fresh leaf key and certificate; return ``(cert, key, ca_cert)``."""
    ca_cert, ca_key = _load_ca(ca_dir)
    key = _new_key()
    now = dt.datetime.now(dt.UTC)
    # A leaf must not outlive its CA; verifiers would reject it past that day.
    not_after = min(now + LEAF_VALIDITY, ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_LEAF_KEY_USAGE, critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key, ca_cert


def issue_host_cert(
    ca_dir: Path,
    out_dir: Path,
    host: str,
    *,
    dns_names: Sequence[str] = (),
    ips: Sequence[str] = (),
) -> CertInfo:
    """Issue ``host``'s certificate and write the host layout into ``out_dir``.

    The host name is always the first DNS SAN; ``dns_names`` and ``ips`` add
    the other names peers and QEMU (``tls-hostname``) may dial it by.
    Re-issuing replaces the previous key and certificate in ``out_dir``.
    """
    _check_name(host, "host")
    names = list(dict.fromkeys([host, *(_check_dns_name(n) for n in dns_names)]))
    addrs = list(dict.fromkeys(_check_ip(ip) for ip in ips))
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, _OU_HOSTS),
            x509.NameAttribute(NameOID.COMMON_NAME, host),
        ]
    )
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(a) for a in addrs]
    cert, key, ca_cert = _issue(
        ca_dir,
        subject,
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        sans,
    )
    cert_pem, key_pem = _pem_cert(cert), _pem_key(key)
    _write_files(
        out_dir,
        {
            CA_CERT: (_pem_cert(ca_cert), False),
            SERVER_KEY: (key_pem, True),
            SERVER_CERT: (cert_pem, False),
            CLIENT_KEY: (key_pem, True),
            CLIENT_CERT: (cert_pem, False),
        },
    )
    info = _info(cert)
    log.info("issued host certificate for %s into %s (%s)", host, out_dir, info.thumbprint)
    return info


def issue_admin_cert(ca_dir: Path, out_dir: Path, name: str = "admin") -> CertInfo:
    """Issue an admin (CLI) client certificate and write the admin layout."""
    _check_name(name, "admin")
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, _OU_ADMINS),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    cert, key, ca_cert = _issue(ca_dir, subject, [ExtendedKeyUsageOID.CLIENT_AUTH], [])
    _write_files(
        out_dir,
        {
            CA_CERT: (_pem_cert(ca_cert), False),
            CLIENT_KEY: (_pem_key(key), True),
            CLIENT_CERT: (_pem_cert(cert), False),
        },
    )
    info = _info(cert)
    log.info("issued admin certificate for %s into %s (%s)", name, out_dir, info.thumbprint)
    return info


# -- reading certificates -----------------------------------------------------


def _info(cert: x509.Certificate) -> CertInfo:
    subject = cert.subject
    cns = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = [a.value for a in subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    role = next((_ROLE_BY_OU[ou] for ou in ous if isinstance(ou, str) and ou in _ROLE_BY_OU), None)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        dns: list[str] = []
        ips: list[str] = []
    else:
        dns = san.get_values_for_type(x509.DNSName)
        ips = [str(a) for a in san.get_values_for_type(x509.IPAddress)]
    cn = cns[0].value if cns else ""
    return CertInfo(
        subject=subject.rfc4514_string(),
        common_name=cn if isinstance(cn, str) else cn.decode(errors="replace"),
        role=role,
        thumbprint=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        not_after=cert.not_valid_after_utc,
        dns_names=tuple(dns),
        ips=tuple(ips),
    )


def cert_info_from_der(der: bytes) -> CertInfo:
    """Read a DER certificate, e.g. ``ssl_object.getpeercert(binary_form=True)``."""
    try:
        cert = x509.load_der_x509_certificate(der)
        return _info(cert)
    except ValueError as exc:
        raise PkiError(f"the peer sent a certificate ferry cannot read: {exc}") from exc


def load_cert_info(pem_path: Path) -> CertInfo:
    """Read the PEM certificate at ``pem_path``."""
    cert = _load_pem_cert(pem_path, "re-issue the certificate")
    try:
        return _info(cert)
    except ValueError as exc:
        raise PkiError(f"{pem_path} holds a certificate ferry cannot read: {exc}") from exc


def thumbprint(pem_path: Path) -> str:
    """SHA-256 of the certificate's DER, lowercase hex, no colons."""
    return load_cert_info(pem_path).thumbprint


def _split_rdns(dn: str) -> list[str]:
    """Split an RFC 4514 string at the commas that separate RDNs."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(dn)
    for ch in chars:
        if ch == "\\":
            current.append(ch + next(chars, ""))
        elif ch == ",":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def qemu_dn(info: CertInfo) -> str:
    """The subject as QEMU's ``authz-simple`` compares it (``identity=``).

    QEMU takes the peer's DN from GnuTLS's ``gnutls_x509_crt_get_dn`` (7.2;
    later releases call ``gnutls_x509_crt_get_dn2``, which renders the same).
    Both keep the certificate's RDN order, most significant first
    (``O=ferry,OU=hosts,CN=hosta``): the reverse of RFC 4514 and of
    :attr:`CertInfo.subject`. Only ``gnutls_x509_crt_get_dn3`` without the
    compat flag reverses it. Checked against QEMU 7.2 / GnuTLS 3.7.9 in
    ``tests/integration/test_pki_qemu.py``. Escapes stay as RFC 4514 writes
    them, which agrees with GnuTLS for the names ferry issues (they hold no
    special characters). On a ``-object`` command line double each comma;
    over QMP pass the string as is.
    """
    return ",".join(reversed(_split_rdns(info.subject)))


# -- TLS contexts -------------------------------------------------------------


def _require(path: Path, remedy: str) -> str:
    if not path.is_file():
        raise PkiError(f"{path} does not exist; {remedy}")
    return str(path)


def _load_into(
    ctx: ssl.SSLContext, tls_dir: Path, cert_name: str, key_name: str, remedy: str
) -> None:
    ca = _require(tls_dir / CA_CERT, remedy)
    cert = _require(tls_dir / cert_name, remedy)
    key = _require(tls_dir / key_name, remedy)
    try:
        ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise PkiError(f"cannot load {ca}: {exc}; {remedy}") from exc
    try:
        ctx.load_cert_chain(certfile=cert, keyfile=key)
    except (ssl.SSLError, OSError) as exc:
        raise PkiError(f"cannot load {cert} with {key}: {exc}; {remedy}") from exc


def server_ssl_context(tls_dir: Path) -> ssl.SSLContext:
    """A TLS 1.2+ server context that demands a client certificate from the ferry CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_into(ctx, tls_dir, SERVER_CERT, SERVER_KEY, "issue this host's certificate into it")
    return ctx


def client_ssl_context(tls_dir: Path) -> ssl.SSLContext:
    """A TLS 1.2+ client context that trusts only the ferry CA and checks host names.

    Works with a host dir (agent to agent) and an admin dir (CLI to agent).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_into(ctx, tls_dir, CLIENT_CERT, CLIENT_KEY, "issue a host or admin certificate into it")
    return ctx
