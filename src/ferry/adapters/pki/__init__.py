"""Ferry's private PKI: one CA per deployment, host and admin certificates.

Every ferry connection is mutual TLS against this CA: the CLI with an admin
certificate, agents with host certificates, and QEMU with the same host
certificates for migration and NBD. One module per concept:

- :mod:`.issue` makes the CA and the host and admin certificates;
- :mod:`.files` lays them out on disk the way QEMU's ``tls-creds-x509``
  reads them (the directory layouts are drawn there);
- :mod:`.identify` reads certificates back into :class:`CertInfo` (subject,
  role, thumbprint; the subjects are drawn there) and renders a DN as QEMU
  compares it;
- :mod:`.tls` builds the ``ssl.SSLContext`` objects the agent and its clients use.

Callers import the names below from ``ferry.adapters.pki``.
"""

from __future__ import annotations

from ferry.adapters.pki.files import (
    CA_CERT,
    CA_KEY,
    CLIENT_CERT,
    CLIENT_KEY,
    SERVER_CERT,
    SERVER_KEY,
)
from ferry.adapters.pki.identify import (
    ORGANIZATION,
    CertInfo,
    Role,
    cert_info_from_der,
    load_cert_info,
    qemu_dn,
    thumbprint,
)
from ferry.adapters.pki.issue import (
    CA_VALIDITY,
    DEFAULT_CA_NAME,
    LEAF_VALIDITY,
    HostCertPems,
    create_ca,
    host_cert_pems,
    issue_admin_cert,
    issue_host_cert,
    write_host_dir,
)
from ferry.adapters.pki.tls import client_ssl_context, server_ssl_context

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "CA_VALIDITY",
    "CLIENT_CERT",
    "CLIENT_KEY",
    "DEFAULT_CA_NAME",
    "LEAF_VALIDITY",
    "ORGANIZATION",
    "SERVER_CERT",
    "SERVER_KEY",
    "CertInfo",
    "HostCertPems",
    "Role",
    "cert_info_from_der",
    "client_ssl_context",
    "create_ca",
    "host_cert_pems",
    "issue_admin_cert",
    "issue_host_cert",
    "load_cert_info",
    "qemu_dn",
    "server_ssl_context",
    "thumbprint",
    "write_host_dir",
]
