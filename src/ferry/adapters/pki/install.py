"""Checking a renewed host certificate and putting it in place of the old one.

``ferry pki renew`` issues the new certificate on the admin's machine (which
holds the CA) and the agent installs it: :func:`check_host_pems` makes sure
it is this host's (same CA, same name, a host certificate, the key fits,
valid now), :func:`install_host_pems` writes it over the host dir's server
and client pairs all or nothing, leaving ``ca-cert.pem`` alone.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ferry.adapters.pki.files import (
    CA_CERT,
    CLIENT_CERT,
    CLIENT_KEY,
    SERVER_CERT,
    SERVER_KEY,
    load_pem_cert,
    write_files,
)
from ferry.adapters.pki.identify import CertInfo, Role, cert_info
from ferry.errors import InvalidInputError


def _public(key: object) -> bytes:
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise InvalidInputError("the certificate's key is neither RSA nor ECDSA")
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    ca_key = ca.public_key()
    hash_algorithm = cert.signature_hash_algorithm
    if hash_algorithm is None:
        return False
    try:
        if isinstance(ca_key, rsa.RSAPublicKey):
            ca_key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                          hash_algorithm)  # fmt: skip
        elif isinstance(ca_key, ec.EllipticCurvePublicKey):
            ca_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hash_algorithm))
        else:
            return False
    except Exception:  # cryptography's InvalidSignature and malformed input alike
        return False
    return cert.issuer == ca.subject


def check_host_pems(tls_dir: Path, host: str, cert_pem: bytes, key_pem: bytes) -> CertInfo:
    """The new certificate's facts, if it may replace ``host``'s (else InvalidInputError)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        info = cert_info(cert)
    except (ValueError, TypeError) as exc:
        raise InvalidInputError(f"the new certificate or key cannot be read: {exc}") from exc
    ca = load_pem_cert(tls_dir / CA_CERT, "restore the host's TLS dir")
    if not _signed_by(cert, ca):
        raise InvalidInputError("the new certificate was not signed by this host's CA "
                                f"({ca.subject.rfc4514_string()})")  # fmt: skip
    if info.role is not Role.HOST or info.common_name != host:
        raise InvalidInputError(f"the new certificate is for {info.subject!r}, not host {host!r}")
    if _public(key.public_key()) != _public(cert.public_key()):
        raise InvalidInputError("the new key does not belong to the new certificate")
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise InvalidInputError(f"the new certificate is not valid now (valid "
                                f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                                f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)")  # fmt: skip
    return info


def install_host_pems(tls_dir: Path, cert_pem: bytes, key_pem: bytes) -> None:
    """Write the new pair as both the server and the client pair of the host dir."""
    write_files(tls_dir, {SERVER_KEY: (key_pem, True), SERVER_CERT: (cert_pem, False),
                          CLIENT_KEY: (key_pem, True), CLIENT_CERT: (cert_pem, False)})  # fmt: skip
