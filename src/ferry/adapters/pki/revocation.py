"""The deny-list of revoked certificates, as a JSON file in a data dir or CA dir.

``ferry pki revoke`` keeps the master list next to the CA (``revoked.json``)
and pushes it to every agent, which keeps its copy in its data dir so that a
restarted agent refuses the same certificates. An entry names a certificate
by serial number (lowercase hex, unique under one CA); the host, thumbprint
and reason are for people. Entries are only ever added: merging two lists is
their union, so a stale copy can never bring a revoked certificate back.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ferry.adapters.pki.files import read_file, write_files
from ferry.errors import InvalidInputError, PkiError

REVOKED_FILE = "revoked.json"


@dataclass(frozen=True)
class Revoked:
    """One revoked certificate."""

    serial: str
    host: str = ""
    thumbprint: str = ""
    reason: str = ""
    revoked_at: float = 0.0


def check_serial(text: str) -> str:
    """A serial number as ferry stores it: lowercase hex, no colons or leading zeros."""
    cleaned = text.strip().lower().replace(":", "").removeprefix("0x")
    try:
        value = int(cleaned, 16)
    except ValueError:
        raise InvalidInputError(f"{text!r} is not a certificate serial number (hex)") from None
    if value <= 0:
        raise InvalidInputError(f"{text!r} is not a certificate serial number (hex)")
    return format(value, "x")


class RevocationList:
    """The revoked serials in ``path`` (kept in memory, saved on every change)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, Revoked] = {}
        if path.exists():
            self._entries = {e.serial: e for e in _parse(path)}

    @property
    def entries(self) -> list[Revoked]:
        return sorted(self._entries.values(), key=lambda e: (e.revoked_at, e.serial))

    def is_revoked(self, serial: str) -> bool:
        return serial in self._entries

    def get(self, serial: str) -> Revoked | None:
        return self._entries.get(serial)

    def merge(self, entries: list[Revoked]) -> list[Revoked]:
        """Add ``entries`` not listed yet, save, and return the ones added."""
        added = []
        for entry in entries:
            serial = check_serial(entry.serial)
            if serial not in self._entries:
                stamped = Revoked(serial, entry.host, entry.thumbprint, entry.reason,
                                  entry.revoked_at or time.time())  # fmt: skip
                self._entries[serial] = stamped
                added.append(stamped)
        if added:
            self._save()
        return added

    def _save(self) -> None:
        data = json.dumps({"revoked": [asdict(e) for e in self.entries]}, indent=1)
        write_files(self.path.parent, {self.path.name: (data.encode() + b"\n", False)})


def _parse(path: Path) -> list[Revoked]:
    raw = read_file(path, "restore it from the CA dir's copy with 'ferry pki revocations --push'")
    try:
        data = json.loads(raw)
        return [Revoked(serial=check_serial(str(e["serial"])), host=str(e.get("host", "")),
                        thumbprint=str(e.get("thumbprint", "")), reason=str(e.get("reason", "")),
                        revoked_at=float(e.get("revoked_at", 0.0)))
                for e in data["revoked"]]  # fmt: skip
    except (ValueError, KeyError, TypeError, InvalidInputError) as exc:
        raise PkiError(f"{path} is not a ferry revocation list ({exc})") from exc
