"""``replication set --network-map``: nothing (unchanged), ``none`` (cleared) or SRC=DST."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.cli.replication_cmd import _set_network_map
from ferry.errors import InvalidInputError
from tests.conftest import Cli


def test_none_clears_the_map_and_nothing_leaves_it() -> None:
    assert _set_network_map([]) is None  # unchanged
    assert _set_network_map(["none"]) == {}  # cleared: every NIC on its own name
    assert _set_network_map([" None "]) == {}
    assert _set_network_map(["lab=prod", "dmz=prod"]) == {"lab": "prod", "dmz": "prod"}


def test_none_with_pairs_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="--network-map none clears the map"):
        _set_network_map(["none", "lab=prod"])


def test_the_cli_refuses_none_with_pairs_in_one_line(tmp_path: Path) -> None:
    line = Cli(tmp_path).fails("replication", "set", "web", "--network-map", "none",
                               "--network-map", "lab=prod")  # fmt: skip
    assert "--network-map none clears the map: give it alone" in line, line
    help_text = Cli(tmp_path)("replication", "set", "--help").stdout.replace("│", " ")
    assert "'none' clears the map" in " ".join(help_text.split())
