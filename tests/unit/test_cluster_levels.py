"""The cluster's functional level: upgrade-level, joins, a new VM's version."""

from __future__ import annotations

import pytest

from ferry.core.cluster.levels import check_join, config_version_for, lowest_level, upgrade_target
from ferry.errors import StateError, VersionError


def test_lowest_level() -> None:
    assert lowest_level({"a": 3, "b": 2}) == 2


def test_upgrade_refused_while_a_node_is_older() -> None:
    with pytest.raises(VersionError) as caught:
        upgrade_target("c1", 2, {"host-1": 3, "host-2": 2, "host-3": 3})
    assert str(caught.value) == (
        "cannot raise cluster 'c1' to functional level 3: node host-2 (2) runs an older "
        "level; upgrade it first (drain, upgrade, resume)"
    )
    with pytest.raises(VersionError, match="nodes host-2 \\(2\\), host-3 \\(1\\) run"):
        upgrade_target("c1", 1, {"host-1": 3, "host-2": 2, "host-3": 1})


def test_upgrade_to_the_level_every_node_runs() -> None:
    assert upgrade_target("c1", 2, {"host-1": 3, "host-2": 3}) == 3


def test_nothing_to_raise() -> None:
    with pytest.raises(StateError, match="already at functional level 3"):
        upgrade_target("c1", 3, {"host-1": 3, "host-2": 3})


def test_a_newer_node_joins_an_older_cluster_not_the_other_way() -> None:
    check_join("host-4", 3, "c1", 2)
    with pytest.raises(VersionError, match="host 'host-4' runs functional level 1, below"):
        check_join("host-4", 1, "c1", 2)


def test_config_version_of_a_new_clustered_vm() -> None:
    assert config_version_for(None, "c1", 2, 3) == 2
    assert config_version_for(3, "c1", 2, 3) == 3
    with pytest.raises(VersionError, match="runs on no node"):
        config_version_for(3, "c1", 2, 2)
