"""TLS contexts from a host or admin dir: TLS 1.2+, the ferry CA only, a certificate required."""

from __future__ import annotations

import ssl
from pathlib import Path

from ferry.adapters.pki.files import (
    CA_CERT,
    CLIENT_CERT,
    CLIENT_KEY,
    SERVER_CERT,
    SERVER_KEY,
    require_file,
)
from ferry.errors import PkiError


def _load_into(
    ctx: ssl.SSLContext, tls_dir: Path, cert_name: str, key_name: str, remedy: str
) -> None:
    ca = require_file(tls_dir / CA_CERT, remedy)
    cert = require_file(tls_dir / cert_name, remedy)
    key = require_file(tls_dir / key_name, remedy)
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
