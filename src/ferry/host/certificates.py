"""This host's certificate over time: renewal in place, renewed pins, revoked peers.

Renewal (``ferry pki renew``; the admin's machine holds the CA and issues
the new certificate for the host's existing name and addresses):

1. the new pair is checked (this host's CA and name, a host certificate,
   the key fits, valid now);
2. every partner this host's records pin (:class:`PinFollower`) is asked
   ``hello``; one that does not answer stops the renewal, nothing changed,
   unless ``force``;
3. each partner is told ``old -> new`` over the old channel (this host's old
   certificate, the one it pins: :mod:`ferry.peer.renewal`) and rewrites its
   pins, accepting both for a grace period (:mod:`ferry.core.renewal`);
4. the files are replaced and the agent's one server context and one peer
   client context load the new pair in place: connections made from then
   on present it, open ones keep the old until they close. Nothing restarts;
   the VMs are not touched. QEMU reads the dir when a move creates its
   ``tls-creds-x509`` object, so later moves use the new pair (its
   ``authz`` compares the subject, which renewal keeps).

The same object is the agent's trust beyond the CA: :meth:`vet` is the
edge's check of every caller (revoked: refused; a renewed thumbprint: taken
as the newest) and :meth:`check_server` the peer client's check of every
agent it calls (revoked: refused; the pin, or the one it was renewed to).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from ferry.adapters.pki import (
    CLIENT_CERT,
    CLIENT_KEY,
    SERVER_CERT,
    SERVER_KEY,
    CertInfo,
    Role,
    cert_info_from_der,
    load_cert_info,
)
from ferry.adapters.pki.install import check_host_pems, install_host_pems
from ferry.core.renewal import RenewedPins, check_thumbprint
from ferry.errors import AuthError, ConflictError, ConnectionFailedError, FerryError
from ferry.host.config import HostConfig
from ferry.host.replication.extension import ExtensionService
from ferry.host.replication.pins import RENEWAL_TURN, Partner, PinFollower
from ferry.host.replication.receiver import ReplicaStore
from ferry.host.revocations import Revocations
from ferry.host.vms.service import VmService
from ferry.peer.client import PeerConnector, Timeout
from ferry.peer.https import check_pin
from ferry.peer.renewal import RENEWAL, RenewalAck, RenewalNotice
from ferry.peer.replication import HELLO
from ferry.peer.server import Call, PeerServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartnerTold:
    host: str
    pins_updated: int | None  # None: not told
    error: str | None = None


@dataclass(frozen=True)
class Renewed:
    host: str
    old: CertInfo
    new: CertInfo
    partners: list[PartnerTold]


class HostCertificates:
    """Renews this host's certificate in place; vets callers and called agents."""

    def __init__(self, config: HostConfig, server_tls: ssl.SSLContext, peers: PeerConnector,
                 pins: PinFollower, revocations: Revocations) -> None:  # fmt: skip
        self.config = config
        self.server_tls = server_tls
        self.peers = peers
        self.pins = pins
        self.revocations = revocations
        self.renewed = RenewedPins()
        # Told the new thumbprint once it is installed (the cluster's identity record).
        self.on_renewed: list[Callable[[str], None]] = []
        self._lock = asyncio.Lock()

    @classmethod
    def build(cls, config: HostConfig, server_tls: ssl.SSLContext, peers: PeerConnector, *,
              vms: VmService, store: ReplicaStore, extensions: ExtensionService,
              peer_server: PeerServer) -> HostCertificates:  # fmt: skip
        """The agent's one instance: its pins follow under the records' own locks."""
        pins = PinFollower(vms.catalog,
                           primary_lock=lambda key: vms.turns.turn(key, RENEWAL_TURN),
                           replica_lock=store.lock,
                           extension_lock=lambda key: extensions.scheduler.locks[key])  # fmt: skip
        certificates = cls(config, server_tls, peers, pins, Revocations(config.data_dir))
        peers.trust = certificates
        peer_server.handle(RENEWAL, certificates.on_renewal)
        return certificates

    def current(self) -> CertInfo:
        return load_cert_info(self.config.tls_dir / SERVER_CERT)

    # -- trust beyond the CA ------------------------------------------------------

    def vet(self, caller: CertInfo) -> CertInfo:
        """The caller as the rules see it; AuthError if its certificate is revoked."""
        self.revocations.check(caller)
        if caller.role is Role.HOST:
            newest = self.renewed.current(caller.common_name, caller.thumbprint)
            if newest != caller.thumbprint:
                return dataclasses.replace(caller, thumbprint=newest)
        return caller

    def check_server(self, name: str, where: str, pin: str | None, der: bytes | None) -> None:
        if der:
            self.revocations.check(cert_info_from_der(der), what=f"{where}: certificate")
            if pin and self.renewed.accepts(name, pin, hashlib.sha256(der).hexdigest()):
                return
        check_pin(where, pin, der)

    # -- a partner renewed ---------------------------------------------------------

    async def on_renewal(self, call: Call[RenewalNotice]) -> RenewalAck:
        host = call.require_host()
        old = check_thumbprint(call.body.old_thumbprint)
        new = check_thumbprint(call.body.new_thumbprint)
        if call.caller.thumbprint != old:
            raise AuthError(f"host {host!r} announced a renewal of certificate {old[:16]}... "
                            f"over another one ({call.caller.thumbprint[:16]}...); a renewal "
                            "is announced over the certificate it replaces")  # fmt: skip
        if new == old:
            raise ConflictError(f"host {host!r} announced a renewal to the same certificate")
        updated = self.pins.follow(host, old, new)
        if updated:
            self.renewed.add(host, old, new)
        log.info("host %s renewed its certificate %s -> %s: %d pin(s) follow", host, old[:16],
                 new[:16], updated)  # fmt: skip
        return RenewalAck(host=self.config.name, pins_updated=updated)

    # -- this host renews -------------------------------------------------------------

    async def renew(self, cert_pem: bytes, key_pem: bytes, *, force: bool = False) -> Renewed:
        async with self._lock:
            old = self.current()
            new = check_host_pems(self.config.tls_dir, self.config.name, cert_pem, key_pem)
            if new.thumbprint == old.thumbprint:
                raise ConflictError(f"host {self.config.name!r} already has this certificate")
            self.revocations.check(new, what="the new certificate")
            partners = self.pins.partners()
            away = await self._unreachable(partners)
            if away and not force:
                raise ConnectionFailedError(
                    f"cannot tell {', '.join(sorted(away))} about the new certificate ("
                    + "; ".join(sorted(away.values()))
                    + "); nothing changed: renew when they "
                    "answer, or pass --force and pin the new thumbprint there by hand"
                )
            told = [await self._tell(p, old.thumbprint, new.thumbprint) if p.name not in away
                    else PartnerTold(p.name, None, away[p.name]) for p in partners]  # fmt: skip
            tls = self.config.tls_dir
            install_host_pems(tls, cert_pem, key_pem)
            self.server_tls.load_cert_chain(certfile=str(tls / SERVER_CERT),
                                            keyfile=str(tls / SERVER_KEY))  # fmt: skip
            self.peers.reload(tls / CLIENT_CERT, tls / CLIENT_KEY)
            for hook in self.on_renewed:
                hook(new.thumbprint)
            log.warning("renewed this host's certificate: %s -> %s (serial %s)",
                        old.thumbprint[:16], new.thumbprint[:16], new.serial)  # fmt: skip
            return Renewed(self.config.name, old, new, told)

    async def _unreachable(self, partners: list[Partner]) -> dict[str, str]:
        async def hello(partner: Partner) -> str | None:
            try:
                async with self.peers.connect(partner.name, partner.url, timeout=Timeout.PROBE,
                                              pin=partner.pin or None) as peer:  # fmt: skip
                    await peer.call(HELLO)
            except FerryError as exc:
                return f"{partner.name}: {exc}"
            return None

        found = await asyncio.gather(*(hello(p) for p in partners))
        return {p.name: why for p, why in zip(partners, found, strict=True) if why}

    async def _tell(self, partner: Partner, old: str, new: str) -> PartnerTold:
        notice = RenewalNotice(old_thumbprint=old, new_thumbprint=new)
        try:
            async with self.peers.connect(partner.name, partner.url,
                                          pin=partner.pin or None) as peer:  # fmt: skip
                ack = await peer.call(RENEWAL, notice)
        except FerryError as exc:
            log.warning("could not tell host %s about the renewal: %s", partner.name, exc)
            return PartnerTold(partner.name, None, str(exc))
        return PartnerTold(partner.name, ack.pins_updated)
