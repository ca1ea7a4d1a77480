"""Who may act on a replication relationship: the rules as a table."""

from __future__ import annotations

import pytest

from ferry.core.replication import ArrivedMove, Caller, check_partner, check_takeover
from ferry.errors import AuthError

PRIMARY_TP = "a" * 64
OTHER_TP = "b" * 64

PRIMARY = Caller("host-1", PRIMARY_TP)
THIRD = Caller("host-3", "c" * 64)
IMPOSTOR = Caller("host-1", OTHER_TP)  # the primary's name, another certificate
ADMIN = Caller("admin", "d" * 64, admin=True)


@pytest.mark.parametrize(
    ("caller", "partner", "thumbprint", "allowed"),
    [
        (PRIMARY, "host-1", PRIMARY_TP, True),
        (PRIMARY, "host-1", "", True),  # nothing pinned: the name decides
        (THIRD, "host-1", PRIMARY_TP, False),
        (THIRD, "host-1", "", False),
        (IMPOSTOR, "host-1", PRIMARY_TP, False),
        (Caller("host-3", PRIMARY_TP), "host-1", PRIMARY_TP, False),  # name must match too
        (ADMIN, "host-1", PRIMARY_TP, True),
    ],
)
def test_only_the_pinned_partner_acts_on_a_relationship(
    caller: Caller, partner: str, thumbprint: str, allowed: bool
) -> None:
    if allowed:
        check_partner(caller, vm="web", partner=partner, thumbprint=thumbprint)
        return
    with pytest.raises(AuthError) as info:
        check_partner(caller, vm="web", partner=partner, thumbprint=thumbprint)
    message = str(info.value)
    assert "\n" not in message
    assert f"host {caller.name!r} is not the primary of VM 'web'" in message
    assert "'host-1'" in message


def test_a_refusal_names_the_partner_role() -> None:
    with pytest.raises(AuthError, match="is not the replica host of VM 'web'"):
        check_partner(THIRD, vm="web", partner="host-2", thumbprint="", role="replica host")


UUID = "6b1f2a6e-0000-4000-8000-000000000001"
OTHER_UUID = "6b1f2a6e-0000-4000-8000-000000000002"


@pytest.mark.parametrize(
    ("caller", "arrived", "refusal"),
    [
        # The VM just arrived from host-1: host-1 hands its replication over.
        (Caller("host-1", PRIMARY_TP), [ArrivedMove(UUID, "host-1", 10.0)], None),
        # A third host, though a ferry host, may not.
        (THIRD, [ArrivedMove(UUID, "host-1", 10.0)], "last arrived here from 'host-1'"),
        # No move of this VM arrived here at all.
        (Caller("host-1", PRIMARY_TP), [], "no move of that VM arrived here"),
        (Caller("host-1", PRIMARY_TP), [ArrivedMove(OTHER_UUID, "host-1", 10.0)],
         "no move of that VM arrived here"),
        # Only the latest arrival counts: it came from host-3 after host-1's.
        (Caller("host-1", PRIMARY_TP),
         [ArrivedMove(UUID, "host-3", 20.0), ArrivedMove(UUID, "host-1", 10.0)],
         "last arrived here from 'host-3'"),
        (Caller("host-3", "c" * 64),
         [ArrivedMove(UUID, "host-3", 20.0), ArrivedMove(UUID, "host-1", 10.0)], None),
        (ADMIN, [], None),
        # The move recorded its source's certificate: the name alone is not enough.
        (Caller("host-1", PRIMARY_TP), [ArrivedMove(UUID, "host-1", 10.0, PRIMARY_TP)], None),
        (IMPOSTOR, [ArrivedMove(UUID, "host-1", 10.0, PRIMARY_TP)],
         "not the one the move came with"),
    ],
)  # fmt: skip
def test_a_takeover_comes_only_from_the_host_the_vm_just_left(
    caller: Caller, arrived: list[ArrivedMove], refusal: str | None
) -> None:
    if refusal is None:
        check_takeover(caller, vm_uuid=UUID, vm="web", here="host-2", arrived=arrived)
        return
    with pytest.raises(AuthError, match=refusal) as info:
        check_takeover(caller, vm_uuid=UUID, vm="web", here="host-2", arrived=arrived)
    assert "\n" not in str(info.value)
    assert info.value.http_status == 403
