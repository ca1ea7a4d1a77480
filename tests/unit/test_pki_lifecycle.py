"""Renewed pins, the deny-list file and the check of a renewed certificate (no agents)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from ferry.adapters import pki
from ferry.adapters.pki.install import check_host_pems
from ferry.adapters.pki.revocation import RevocationList, Revoked, check_serial
from ferry.core.renewal import RenewedPins, check_thumbprint
from ferry.errors import InvalidInputError, PkiError

A, B, C = "a" * 64, "b" * 64, "c" * 64


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_renewed_pins_accept_both_during_the_grace_only() -> None:
    clock = Clock()
    pins = RenewedPins(grace_s=60, clock=clock)
    assert not pins.accepts("h1", A, B)
    pins.add("h1", A, B)
    assert pins.accepts("h1", A, B) and pins.accepts("h1", B, A)
    assert pins.current("h1", A) == B and pins.current("h1", B) == B
    assert not pins.accepts("h2", A, B)  # another host's name: no
    assert not pins.accepts("h1", A, C)
    clock.now = 30
    pins.add("h1", B, C)  # renewed again within the grace: the chain follows
    assert pins.current("h1", A) == C and pins.accepts("h1", A, C)
    clock.now = 61
    assert pins.current("h1", A) == A and pins.accepts("h1", B, C)
    clock.now = 91
    assert not pins.accepts("h1", B, C) and pins.renewals == []


def test_thumbprints_and_serials_are_checked() -> None:
    assert check_thumbprint(":".join([A[i : i + 2] for i in range(0, 64, 2)]).upper()) == A
    for bad in ("", "xyz", A[:-1]):
        with pytest.raises(InvalidInputError):
            check_thumbprint(bad)
    assert check_serial("0x00:1F") == "1f"
    for bad in ("", "0", "zz", "-1"):
        with pytest.raises(InvalidInputError):
            check_serial(bad)


def test_revocation_list_only_grows_and_survives_a_reload(tmp_path: Path) -> None:
    path = tmp_path / "revoked.json"
    listed = RevocationList(path)
    assert listed.entries == [] and not path.exists()
    added = listed.merge([Revoked("1F", host="h1", reason="lost"), Revoked("2a")])
    assert [e.serial for e in added] == ["1f", "2a"] and all(e.revoked_at > 0 for e in added)
    assert listed.merge([Revoked("1f", reason="again")]) == []  # a stale copy changes nothing
    again = RevocationList(path)
    assert again.is_revoked("1f") and again.is_revoked("2a") and not again.is_revoked("3")
    assert again.get("1f") is not None and again.get("1f").reason == "lost"  # type: ignore[union-attr]
    path.write_text(json.dumps({"revoked": [{"serial": "nope"}]}))
    with pytest.raises(PkiError, match="not a ferry revocation list"):
        RevocationList(path)


@pytest.fixture(scope="module")
def cas(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("pki")
    pki.create_ca(root / "ca")
    pki.create_ca(root / "other", name="other-ca")
    pki.issue_host_cert(root / "ca", root / "h1", "h1", ips=["127.0.0.1"])
    return root / "ca", root / "other", root / "h1"


def test_a_renewed_certificate_must_be_this_hosts(cas: tuple[Path, Path, Path]) -> None:
    ca, other, tls = cas
    good = pki.host_cert_pems(ca, "h1", ips=["127.0.0.1"])
    info = check_host_pems(tls, "h1", good.cert_pem, good.key_pem)
    assert info.thumbprint == good.info.thumbprint and info.serial == good.info.serial
    foreign = pki.host_cert_pems(other, "h1")
    wrong_name = pki.host_cert_pems(ca, "h2")
    expired = pki.host_cert_pems(ca, "h1", not_after=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    cases = [
        (foreign.cert_pem, foreign.key_pem, "not signed by this host's CA"),
        (wrong_name.cert_pem, wrong_name.key_pem, "not host 'h1'"),
        (good.cert_pem, wrong_name.key_pem, "does not belong"),
        (expired.cert_pem, expired.key_pem, "not valid now"),
        (b"junk", good.key_pem, "cannot be read"),
    ]
    for cert, key, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            check_host_pems(tls, "h1", cert, key)
    assert expired.info.not_after < dt.datetime.now(dt.UTC)
