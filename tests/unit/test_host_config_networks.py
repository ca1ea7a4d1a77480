"""host.toml's network names follow the rule 'ferry host network add' uses."""

from pathlib import Path

import pytest

from ferry.errors import ConfigError
from ferry.host.config import load_host_config

BASE = 'name = "host-1"\ndata_dir = "/d"\ntls_dir = "/t"\n'


@pytest.mark.parametrize("name", ["a b", "-lab", "lab,x", "a/b", "", "x" * 64])
def test_a_bad_network_name_in_host_toml_is_one_config_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / "host.toml"
    path.write_text(BASE + f'[networks."{name}"]\nbridge = "br0"\n')
    with pytest.raises(ConfigError) as refused:
        load_host_config(path)
    message = str(refused.value)
    assert message.startswith(f"host config {path}: invalid network name")
    assert "\n" not in message


def test_good_network_names_load(tmp_path: Path) -> None:
    path = tmp_path / "host.toml"
    lab, prod = '[networks.lab]\nbridge = "br-lab"\n', '[networks."prod.1"]\nbridge = "br0"\n'
    path.write_text(BASE + lab + prod)
    assert list(load_host_config(path).networks) == ["lab", "prod.1"]
