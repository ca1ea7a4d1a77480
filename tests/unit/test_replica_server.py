import pytest

from ferry.cli.replica_cmd import parse_enable_args
from ferry.core.replica_server import AllowEntry, ReplicaServerSettings, admit, check_settings
from ferry.errors import AuthError, InvalidInputError

SERVER = ReplicaServerSettings(
    enabled=True,
    storage="/srv/replicas",
    allow=(
        AllowEntry(pattern="host-1", trust_group="dc1"),
        AllowEntry(pattern="edge-*", storage="/srv/edge"),
    ),
)


def test_the_first_matching_entry_decides_storage_and_group() -> None:
    first = admit(SERVER, "host-1", server="r")
    assert (first.storage, first.trust_group, first.rule) == ("/srv/replicas", "dc1", "host-1")
    edge = admit(SERVER, "edge-7", server="r")
    assert (edge.storage, edge.trust_group) == ("/srv/edge", None)


def test_unlisted_primaries_are_refused_unless_any_is_allowed() -> None:
    with pytest.raises(AuthError, match="host 'r' does not accept replication from 'host-9'"):
        admit(SERVER, "host-9", server="r")
    anyone = SERVER.model_copy(update={"allow_any": True})
    assert admit(anyone, "host-9", server="r").rule == "any"


def test_a_host_that_is_not_a_replica_server_says_so() -> None:
    with pytest.raises(AuthError, match="host 'r' is not a replica server"):
        admit(ReplicaServerSettings(), "host-1", server="r")
    with pytest.raises(AuthError, match="not a replica server"):
        admit(SERVER.model_copy(update={"enabled": False}), "host-1", server="r")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (ReplicaServerSettings(enabled=True, allow_any=True), "needs --storage"),
        (ReplicaServerSettings(enabled=True, storage="/s"), "must accept someone"),
        (ReplicaServerSettings(enabled=True, storage="rel", allow_any=True), "must be absolute"),
        (ReplicaServerSettings(enabled=True, storage="/a/../b", allow_any=True), "without '..'"),
    ],
)
def test_settings_that_cannot_work_are_refused(
    settings: ReplicaServerSettings, message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        check_settings(settings)


@pytest.mark.parametrize("pattern", ["BAD", "a b", "", "x/y", "host;rm"])
def test_patterns_are_host_name_patterns(pattern: str) -> None:
    with pytest.raises(ValueError, match="not a host name pattern"):
        AllowEntry(pattern=pattern)


def test_enable_arguments_group_per_allow_entry() -> None:
    parsed = parse_enable_args(["--storage", "/s", "--allow", "host-1", "--trust-group", "g",
                                "--allow", "e-*", "--storage", "/e", "--allow-any"])  # fmt: skip
    entries = [{"pattern": "host-1", "trust_group": "g"}, {"pattern": "e-*", "storage": "/e"}]
    assert parsed == {"enabled": True, "storage": "/s", "allow_any": True, "allow": entries}


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (["--trust-group", "g"], "belongs to an --allow"),
        (["--allow"], "needs a value"),
        (["--storage", "--allow", "x"], "--storage needs a value"),
        (["--frequency", "5m"], "unknown option '--frequency'"),
    ],
)
def test_bad_enable_arguments(tokens: list[str], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        parse_enable_args(tokens)
