"""This host as a replica server: its settings, and admitting primaries.

The rules are :mod:`ferry.core.replica_server`; this keeps the settings in
the catalog and makes sure the storage dirs exist before they are promised.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ferry.adapters.catalog import Catalog
from ferry.core.replica_server import Admission, ReplicaServerSettings, admit, check_settings
from ferry.errors import InvalidInputError

log = logging.getLogger(__name__)

SETTING = "replica_server"


class ReplicaServer:
    def __init__(self, catalog: Catalog, *, host: str) -> None:
        self.catalog = catalog
        self.host = host

    def settings(self) -> ReplicaServerSettings:
        raw = self.catalog.setting(SETTING)
        if raw is None:
            return ReplicaServerSettings()
        return ReplicaServerSettings.model_validate_json(raw)

    def configure(self, settings: ReplicaServerSettings) -> ReplicaServerSettings:
        check_settings(settings)
        dirs = [settings.storage] + [entry.storage for entry in settings.allow]
        for raw in filter(None, dirs):
            path = Path(raw)
            if not path.parent.is_dir():
                raise InvalidInputError(
                    f"storage dir {raw!r}: its parent does not exist on host {self.host!r}"
                )
            path.mkdir(exist_ok=True)
        self.catalog.put_setting(SETTING, settings.model_dump_json())
        log.info("replica server %s", "enabled" if settings.enabled else "disabled")
        return settings

    def disable(self) -> ReplicaServerSettings:
        current = self.settings()
        return self.configure(current.model_copy(update={"enabled": False}))

    def admit(self, primary: str) -> Admission:
        return admit(self.settings(), primary, server=self.host)
