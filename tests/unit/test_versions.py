import pytest

from ferry.core.versions import (
    DATA_SCHEMA_VERSION,
    MACHINE_TYPES,
    MAX_CONFIG_VERSION,
    check_data_schema,
    check_functional_level,
    check_host_runs,
    machine_type,
    supported_range,
)
from ferry.errors import InvalidInputError, VersionError


def test_each_config_version_pins_its_own_machine_type() -> None:
    assert len(set(MACHINE_TYPES.values())) == len(MACHINE_TYPES)
    assert machine_type(1) == "pc-q35-7.0"
    with pytest.raises(VersionError, match="configuration version 99 is unknown"):
        machine_type(99)


def test_a_host_runs_versions_up_to_its_functional_level() -> None:
    assert supported_range(2) == (1, 2)
    check_host_runs(2, 2, host="old", vm="web")
    check_host_runs(1, 3, host="new", vm="web")
    with pytest.raises(VersionError) as info:
        check_host_runs(3, 2, host="old", vm="web")
    assert "host 'old' runs configuration versions 1..2" in str(info.value)
    assert "configuration version 3" in str(info.value)


def test_functional_level_must_be_known() -> None:
    assert check_functional_level(MAX_CONFIG_VERSION) == MAX_CONFIG_VERSION
    with pytest.raises(InvalidInputError):
        check_functional_level(MAX_CONFIG_VERSION + 1)
    with pytest.raises(InvalidInputError):
        check_functional_level(0)


def test_a_newer_data_dir_is_refused_naming_both_versions() -> None:
    check_data_schema(DATA_SCHEMA_VERSION, data_dir="/d")
    check_data_schema(0, data_dir="/d")
    with pytest.raises(VersionError) as info:
        check_data_schema(DATA_SCHEMA_VERSION + 1, data_dir="/d")
    message = str(info.value)
    assert f"schema version {DATA_SCHEMA_VERSION + 1}" in message
    assert f"up to schema version {DATA_SCHEMA_VERSION}" in message
