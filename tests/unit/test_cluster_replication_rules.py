"""Replication of a clustered VM: who may take the primary's place, and how the new owner starts.

Both are pure rules (``core/replication/authority.py``, ``core/relationship.py``),
so they are tables here.
"""

from __future__ import annotations

import pytest

from ferry.core.relationship import (
    CycleInFlight,
    PendingPoint,
    Relationship,
    Role,
    handed_to_new_owner,
    resumed_by_new_owner,
)
from ferry.core.relationship import resume as resume_relationship
from ferry.core.replication import (
    Caller,
    ClusterHost,
    ReplicationState,
    check_primary_change,
    check_primary_or_cluster,
)
from ferry.errors import AuthError

S = ReplicationState
TP1, TP2, TP3, TP4 = ("1" * 64, "2" * 64, "3" * 64, "4" * 64)
HOSTS = (ClusterHost("node-1", TP1), ClusterHost("node-2", TP2), ClusterHost("node-3", TP3))
PRIMARY = Caller("node-1", TP1)  # pinned
MEMBER = Caller("node-2", TP2)
STRANGER = Caller("host-4", TP4)  # a ferry host outside the cluster
MEMBER_NAME_OTHER_CERT = Caller("node-2", TP4)
ADMIN = Caller("admin", "a" * 64, admin=True)
# A member whose certificate was renewed after the hosts were told: it names the
# cluster (a replica cluster's node certificates do), so it counts by that.
RENEWED = Caller("node-2", TP4, dns_names=("c1.cluster.ferry",))
OTHER_CLUSTER = Caller("host-4", TP4, dns_names=("c9.cluster.ferry",))

# (caller, cluster hosts the replica holds, claimed primary, claimed thumbprint,
#  expected: "own" = the pinned primary's change, "claim" = a cluster host's claim,
#  or the refusal's text)
CASES = [
    # The pinned primary changes anything, clustered or not (the old rule).
    (PRIMARY, (), None, None, "own"),
    (PRIMARY, HOSTS, None, None, "own"),
    (PRIMARY, HOSTS, "node-3", TP3, "own"),  # a handover after a live move
    (ADMIN, (), None, None, "own"),
    # A standalone VM: nobody else, whatever it asks.
    (MEMBER, (), "node-2", TP2, "is not the primary of VM 'web'"),
    (STRANGER, (), "host-4", TP4, "is not the primary of VM 'web'"),
    # A clustered VM: a host of the cluster may make itself the primary ...
    (MEMBER, HOSTS, "node-2", TP2, "claim"),
    (Caller("node-3", TP3), HOSTS, "node-3", TP3, "claim"),
    # ... and nothing else: not another host, not with another certificate,
    (MEMBER, HOSTS, "node-3", TP3, "may make only itself the primary"),
    (MEMBER, HOSTS, "node-2", TP3, "may make only itself the primary"),
    (MEMBER, HOSTS, "host-4", TP4, "may make only itself the primary"),
    # ... not the terms alone,
    (MEMBER, HOSTS, None, None, "may only make itself the primary"),
    (MEMBER, HOSTS, "node-2", None, "may only make itself the primary"),
    # A host outside the cluster, or a member's name with another certificate: never.
    (STRANGER, HOSTS, "host-4", TP4, "nor a host of its cluster 'c1'"),
    (MEMBER_NAME_OTHER_CERT, HOSTS, "node-2", TP4, "nor a host of its cluster 'c1'"),
    (Caller("node-1", TP4), HOSTS, "node-1", TP4, "nor a host of its cluster 'c1'"),
    # A certificate that names the cluster: a host of it, for itself only.
    (RENEWED, HOSTS, "node-2", TP4, "claim"),
    (RENEWED, HOSTS, "node-3", TP3, "may make only itself the primary"),
    (RENEWED, (), "node-2", TP4, "is not the primary of VM 'web'"),  # not clustered
    (OTHER_CLUSTER, HOSTS, "host-4", TP4, "nor a host of its cluster 'c1'"),
]


@pytest.mark.parametrize(("caller", "hosts", "primary", "thumbprint", "expected"), CASES)
def test_who_may_take_the_primarys_place(caller: Caller, hosts: tuple[ClusterHost, ...],
                                         primary: str | None, thumbprint: str | None,
                                         expected: str) -> None:  # fmt: skip
    def check() -> bool:
        return check_primary_change(caller, vm="web", partner="node-1", thumbprint=TP1,
                                    cluster="c1", hosts=hosts, new_primary=primary,
                                    new_thumbprint=thumbprint)  # fmt: skip

    if expected in ("own", "claim"):
        assert check() is (expected == "claim")
        return
    with pytest.raises(AuthError, match=expected) as info:
        check()
    assert "\n" not in str(info.value)
    assert info.value.http_status == 403


@pytest.mark.parametrize(
    ("caller", "hosts", "allowed"),
    [
        (PRIMARY, (), True),
        (PRIMARY, HOSTS, True),
        (MEMBER, HOSTS, True),  # may send a change; the body decides what (above)
        (MEMBER, (), False),
        (STRANGER, HOSTS, False),
        (MEMBER_NAME_OTHER_CERT, HOSTS, False),
        (ADMIN, (), True),
    ],
)
def test_the_guard_before_the_body_lets_cluster_hosts_through(
    caller: Caller, hosts: tuple[ClusterHost, ...], allowed: bool
) -> None:
    def check() -> None:
        check_primary_or_cluster(caller, vm="web", partner="node-1", thumbprint=TP1,
                                 cluster="c1", hosts=hosts)  # fmt: skip

    if allowed:
        check()
    else:
        with pytest.raises(AuthError, match="is not the primary of VM 'web'"):
            check()


def _primary(**update: object) -> Relationship:
    rel = Relationship(vm_uuid="u-1", vm_name="web", role=Role.PRIMARY, primary="node-1",
                       replica="host-4", replica_url="https://host-4", frequency_s=30,
                       recovery_points=3, thumbprint=TP4, state=S.REPLICATING,
                       next_point=8, confirmed_point=6, last_started=100.0)  # fmt: skip
    return rel.model_copy(update=update)


PENDING = PendingPoint(id=7, time=90.0, files=("/node-1/replication/u-1/p7/p7-disk0.qcow2",))
FLIGHT = CycleInFlight(id=8, time=99.0, tag="u-1-8", files=("/node-1/p8-disk0.qcow2",),
                       full=False)  # fmt: skip


@pytest.mark.parametrize(
    ("before", "state", "resume_to", "after_resume"),
    [
        # A running relationship resynchronises: the bitmap of a SIGKILLed QEMU is not
        # trustworthy, and pending points were files on the lost node.
        (_primary(), S.RESYNCHRONISING, None, None),
        (_primary(state=S.RESYNCHRONISING), S.RESYNCHRONISING, None, None),
        (_primary(pending=(PENDING,), in_flight=FLIGHT), S.RESYNCHRONISING, None, None),
        # An initial copy starts again (its full copy was cut on the lost node).
        (_primary(state=S.INITIAL_COPY, confirmed_point=None, next_point=1),
         S.INITIAL_COPY, None, None),
        # Paused or stopped: stays so, and resynchronises once resumed.
        (_primary(state=S.PAUSED, resume_to=S.REPLICATING), S.PAUSED, S.RESYNCHRONISING,
         S.RESYNCHRONISING),
        (_primary(state=S.PAUSED), S.PAUSED, S.RESYNCHRONISING, S.RESYNCHRONISING),
        (_primary(state=S.ERROR, error="x"), S.ERROR, S.RESYNCHRONISING, S.RESYNCHRONISING),
        # ... unless it was paused during the initial copy: that is still to do.
        (_primary(state=S.PAUSED, resume_to=S.INITIAL_COPY), S.PAUSED, S.INITIAL_COPY,
         S.INITIAL_COPY),
    ],
)  # fmt: skip
def test_the_new_owner_starts_by_resynchronising(
    before: Relationship, state: S, resume_to: S | None, after_resume: S | None
) -> None:
    after = resumed_by_new_owner(before, node="node-2")
    assert after.primary == "node-2"
    assert (after.state, after.resume_to) == (state, resume_to)
    assert after.pending == () and after.in_flight is None
    # Same terms, same replica and its pinned certificate, same schedule.
    for same in ("replica", "replica_url", "thumbprint", "frequency_s", "recovery_points",
                 "last_started", "confirmed_point", "vm_uuid", "vm_name", "role"):  # fmt: skip
        assert getattr(after, same) == getattr(before, same)
    # Point ids carry on: never one the replica may already hold.
    assert after.next_point >= before.next_point
    assert after.next_point > (before.confirmed_point if before.confirmed_point is not None
                               else -1)  # fmt: skip
    if after_resume is not None:
        assert resume_relationship(after).state is after_resume


def test_ids_carry_on_past_the_confirmed_point_even_if_the_record_lagged() -> None:
    # The owner published next_point 5, then the replica confirmed 9 (record lost).
    after = resumed_by_new_owner(_primary(next_point=5, confirmed_point=9), node="node-2")
    assert after.next_point == 10


def test_only_a_primarys_record_follows_its_vm() -> None:
    with pytest.raises(ValueError, match="only a primary"):
        resumed_by_new_owner(_primary(role=Role.REPLICA), node="node-2")


def test_a_clean_hand_over_between_clusters_keeps_the_bitmap() -> None:
    # copy-roles: the old owner stopped the VM cleanly and sent its pending points.
    before = _primary()
    after = handed_to_new_owner(before, node="node-9")
    assert after.primary == "node-9" and after.state is S.REPLICATING  # no resync
    assert after.model_dump(exclude={"primary"}) == before.model_dump(exclude={"primary"})
    # Files left behind on the old node: as after a node loss.
    for left in ({"pending": (PENDING,)}, {"in_flight": FLIGHT}):
        assert handed_to_new_owner(_primary(**left), node="node-9").state is S.RESYNCHRONISING
    with pytest.raises(ValueError, match="only a primary"):
        handed_to_new_owner(_primary(role=Role.REPLICA), node="node-9")
