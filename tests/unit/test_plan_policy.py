"""The policy file: needs by name pattern or tag, and every bad file one line."""

from __future__ import annotations

import pytest

from ferry.core.plan.plan_file import ReplicationFacts, VmFacts
from ferry.core.plan.policy import parse_policy, tags_of
from ferry.errors import InvalidInputError


def vm(name: str, **kw: object) -> VmFacts:
    return VmFacts(name=name, uuid=f"u-{name}", host="host-1", state="running",
                   memory=1, config_version=1, **kw)  # type: ignore[arg-type]  # fmt: skip


POLICY = """
window = "22:00-02:00"

[[vm]]
match = "db-*"
must-run = true
max-downtime = "500ms"

[[vm]]
tag = "priority:high"
max-downtime = "2s"
window = "01:00-03:00"
"""


def test_needs_by_pattern_and_tag() -> None:
    policy = parse_policy(POLICY)
    db = policy.needs(vm("db-1"))
    assert db.must_run and db.max_downtime_s == 0.5
    assert db.window is not None and db.window.length_s == 4 * 3600
    web = policy.needs(vm("web"))
    assert not web.must_run and web.max_downtime_s is None
    both = policy.needs(vm("db-2", cluster="c1", priority="high"))
    assert both.must_run and both.max_downtime_s == 2.0  # the last entry that sets it wins
    assert both.window is not None and both.window.text == "01:00-03:00"


def test_json_policy() -> None:
    policy = parse_policy('{"vm": [{"match": "*", "max-downtime": 1.5}]}', name="p.json")
    assert policy.needs(vm("x")).max_downtime_s == 1.5


def test_tags() -> None:
    replica = vm("r", replication=ReplicationFacts(role="replica", partners=["host-2"]))
    assert {"host:host-1", "state:running", "role:replica"} <= tags_of(replica)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("mustrun = true", "unknown key 'mustrun' \\(known: window, vm\\)"),
        ('[[vm]]\nmatch = "a"\nmust_run = true', "entry 1: unknown key 'must_run'"),
        ('[[vm]]\nmust-run = true', "exactly one of match"),
        ('[[vm]]\nmatch = "a"\ntag = "b"', "exactly one of match"),
        ('[[vm]]\nmatch = "a"\nmax-downtime = "fast"', "max-downtime 'fast'"),
        ('[[vm]]\nmatch = "a"\nmax-downtime = "0ms"', "max-downtime '0ms' must be more than 0"),
        ('[[vm]]\nmatch = "a"\nmax-downtime = 0', "max-downtime 0 must be more than 0"),
        ('[[vm]]\nmatch = "a"\nmust-run = "yes"', "must-run must be true or false"),
        ('window = "9-5"', "window '9-5' is not HH:MM-HH:MM"),
        ("vm = 3", "vm must be a list"),
        ("[[vm]", "not valid TOML"),
    ],
)  # fmt: skip
def test_bad_policies_are_one_line(text: str, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match) as info:
        parse_policy(text)
    assert "\n" not in str(info.value)
