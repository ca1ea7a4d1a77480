"""Reading certificates: who holds one (:class:`CertInfo`) and its DN as QEMU sees it.

Subjects (in the order of the certificate's RDN sequence)::

    CA      O=ferry, CN=<ca name>
    host    O=ferry, OU=hosts,  CN=<host>    serverAuth + clientAuth, SAN DNS/IP
    admin   O=ferry, OU=admins, CN=<admin>   clientAuth

The role comes from the OU of a certificate the CA signed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from ferry.adapters.pki.files import load_pem_cert
from ferry.errors import PkiError

ORGANIZATION = "ferry"
OU_HOSTS = "hosts"
OU_ADMINS = "admins"


class Role(StrEnum):
    """What a certificate lets its holder do, read from its OU."""

    ADMIN = "admin"
    HOST = "host"


_ROLE_BY_OU = {OU_HOSTS: Role.HOST, OU_ADMINS: Role.ADMIN}


@dataclass(frozen=True)
class CertInfo:
    """The facts about one certificate that ferry decides on.

    ``subject`` is the RFC 4514 string (most specific RDN first, as
    ``cryptography`` and OpenSSL print it); :func:`qemu_dn` gives the form
    QEMU compares. ``thumbprint`` is the SHA-256 of the DER, lowercase hex
    without colons, the value pinned by replication relationships.
    ``serial`` is the serial number in lowercase hex, what a revocation names.
    """

    subject: str
    common_name: str
    role: Role | None
    thumbprint: str
    not_after: dt.datetime
    dns_names: tuple[str, ...]
    ips: tuple[str, ...]
    serial: str = ""


def cert_info(cert: x509.Certificate) -> CertInfo:
    """The :class:`CertInfo` of a parsed certificate (``ValueError`` if it is malformed)."""
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
        serial=format(cert.serial_number, "x"),
    )


def cert_info_from_der(der: bytes) -> CertInfo:
    """Read a DER certificate, e.g. ``ssl_object.getpeercert(binary_form=True)``."""
    try:
        cert = x509.load_der_x509_certificate(der)
        return cert_info(cert)
    except ValueError as exc:
        raise PkiError(f"the peer sent a certificate ferry cannot read: {exc}") from exc


def load_cert_info(pem_path: Path) -> CertInfo:
    """Read the PEM certificate at ``pem_path``."""
    cert = load_pem_cert(pem_path, "re-issue the certificate")
    try:
        return cert_info(cert)
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
