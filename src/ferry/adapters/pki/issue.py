"""Making the CA and issuing host and admin certificates from it.

All keys are RSA 2048. ECDSA P-256 would be smaller and faster, but RSA is
what every GnuTLS build behind QEMU and every OpenSSL behind Python takes
without question, and one key type keeps one code path. The subjects are
drawn in :mod:`ferry.adapters.pki.identify`, the files each writes in
:mod:`ferry.adapters.pki.files`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ferry.adapters.pki.files import (
    CA_CERT,
    CA_KEY,
    CLIENT_CERT,
    CLIENT_KEY,
    SERVER_CERT,
    SERVER_KEY,
    load_pem_cert,
    read_file,
    write_files,
)
from ferry.adapters.pki.identify import ORGANIZATION, OU_ADMINS, OU_HOSTS, CertInfo, cert_info
from ferry.errors import InvalidInputError, PkiError

log = logging.getLogger(__name__)

DEFAULT_CA_NAME = "ferry-ca"

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
    write_files(ca_dir, {CA_KEY: (_pem_key(key), True), CA_CERT: (_pem_cert(cert), False)})
    log.info("created CA %r in %s", name, ca_dir)
    return ca_dir / CA_CERT


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, _SigningKey]:
    remedy = "create the CA first, or point ferry at the right CA dir"
    cert = load_pem_cert(ca_dir / CA_CERT, remedy)
    key_path = ca_dir / CA_KEY
    data = read_file(key_path, remedy)
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
    not_after: dt.datetime | None = None,
) -> tuple[x509.Certificate, rsa.RSAPrivateKey, x509.Certificate]:
    """Sign a fresh leaf key and certificate; return ``(cert, key, ca_cert)``.

    ``not_after`` other than the default is for tests (an expired certificate).
    """
    ca_cert, ca_key = _load_ca(ca_dir)
    key = _new_key()
    now = dt.datetime.now(dt.UTC)
    # A leaf must not outlive its CA; verifiers would reject it past that day.
    not_after = min(not_after or now + LEAF_VALIDITY, ca_cert.not_valid_after_utc)
    not_before = min(now, not_after - dt.timedelta(days=1)) - _CLOCK_SKEW
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
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


@dataclass(frozen=True)
class HostCertPems:
    """A host certificate issued in memory: what ``ferry pki renew`` sends the agent."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    info: CertInfo


def issue_host_cert(
    ca_dir: Path,
    out_dir: Path,
    host: str,
    *,
    dns_names: Sequence[str] = (),
    ips: Sequence[str] = (),
    not_after: dt.datetime | None = None,
) -> CertInfo:
    """Issue ``host``'s certificate and write the host layout into ``out_dir``.

    The host name is always the first DNS SAN; ``dns_names`` and ``ips`` add
    the other names peers and QEMU (``tls-hostname``) may dial it by.
    Re-issuing replaces the previous key and certificate in ``out_dir``.
    """
    pems = host_cert_pems(ca_dir, host, dns_names=dns_names, ips=ips, not_after=not_after)
    write_host_dir(out_dir, pems)
    log.info("issued host certificate for %s into %s (%s)", host, out_dir, pems.info.thumbprint)
    return pems.info


def write_host_dir(out_dir: Path, pems: HostCertPems) -> None:
    """Write the host layout (QEMU's ``tls-creds-x509`` dir) into ``out_dir``."""
    write_files(
        out_dir,
        {
            CA_CERT: (pems.ca_pem, False),
            SERVER_KEY: (pems.key_pem, True),
            SERVER_CERT: (pems.cert_pem, False),
            CLIENT_KEY: (pems.key_pem, True),
            CLIENT_CERT: (pems.cert_pem, False),
        },
    )


def host_cert_pems(
    ca_dir: Path,
    host: str,
    *,
    dns_names: Sequence[str] = (),
    ips: Sequence[str] = (),
    not_after: dt.datetime | None = None,
) -> HostCertPems:
    """Issue ``host``'s certificate and key in memory (PEM), nothing written."""
    _check_name(host, "host")
    names = list(dict.fromkeys([host, *(_check_dns_name(n) for n in dns_names)]))
    addrs = list(dict.fromkeys(_check_ip(ip) for ip in ips))
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, OU_HOSTS),
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
        not_after,
    )
    return HostCertPems(_pem_cert(cert), _pem_key(key), _pem_cert(ca_cert), cert_info(cert))


def issue_admin_cert(ca_dir: Path, out_dir: Path, name: str = "admin", *,
                     not_after: dt.datetime | None = None) -> CertInfo:  # fmt: skip
    """Issue an admin (CLI) client certificate and write the admin layout."""
    _check_name(name, "admin")
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, OU_ADMINS),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    cert, key, ca_cert = _issue(ca_dir, subject, [ExtendedKeyUsageOID.CLIENT_AUTH], [], not_after)
    write_files(
        out_dir,
        {
            CA_CERT: (_pem_cert(ca_cert), False),
            CLIENT_KEY: (_pem_key(key), True),
            CLIENT_CERT: (_pem_cert(cert), False),
        },
    )
    info = cert_info(cert)
    log.info("issued admin certificate for %s into %s (%s)", name, out_dir, info.thumbprint)
    return info
