"""The client's config in ``$FERRY_HOME`` (default ``~/.ferry``).

``$FERRY_HOME/config.toml``::

    admin_tls_dir = "/home/me/.ferry/admin"   # ca-cert.pem, client-cert.pem, client-key.pem
    lab_dir = "/home/me/.ferry/lab"           # the lab 'ferry lab up' made last

    [hosts.host-1]
    url = "https://127.0.0.1:40123"
    server_name = "host-1"                    # name the host's certificate must carry
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import tomli_w
from pydantic import BaseModel, ConfigDict, ValidationError

from ferry.core.validation import first_error
from ferry.errors import ConfigError, NotFoundError

CONFIG_FILE = "config.toml"


def ferry_home() -> Path:
    return Path(os.environ.get("FERRY_HOME") or Path.home() / ".ferry")


class HostEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str
    server_name: str


class ClientSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    admin_tls_dir: Path | None = None
    lab_dir: Path | None = None
    hosts: dict[str, HostEntry] = {}

    def host(self, name: str) -> HostEntry:
        try:
            return self.hosts[name]
        except KeyError:
            known = ", ".join(sorted(self.hosts)) or "none"
            raise NotFoundError(
                f"unknown host {name!r} (known: {known}); add it with 'ferry host add' "
                "or bring up a lab with 'ferry lab up'"
            ) from None

    def tls_dir(self) -> Path:
        if self.admin_tls_dir is None:
            raise ConfigError(
                f"no admin certificate configured in {ferry_home() / CONFIG_FILE}; "
                "run 'ferry lab up' or 'ferry pki admin' and 'ferry host add'"
            )
        return self.admin_tls_dir


def load_settings(home: Path | None = None) -> ClientSettings:
    path = (home or ferry_home()) / CONFIG_FILE
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return ClientSettings()
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    try:
        return ClientSettings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {first_error(exc)}") from exc


def save_settings(settings: ClientSettings, home: Path | None = None) -> Path:
    """Write atomically so a crash never leaves half a config."""
    home = home or ferry_home()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = home / CONFIG_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(tomli_w.dumps(settings.model_dump(mode="json", exclude_none=True)))
    tmp.replace(path)
    return path
