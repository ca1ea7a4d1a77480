"""The agent's log output: ``text`` (for a terminal) or ``json`` (one event per line).

A JSON line::

    {"ts": "2026-12-02T05:31:07.123Z", "level": "INFO", "host": "host-1",
     "logger": "ferry.host.migration.source.vm1", "msg": "move 3f..: copying",
     "vm": "vm1", "job": "3f..", "kind": "move", "peer": "host-2"}

``vm``, ``vm_uuid``, ``job``, ``kind`` and ``peer`` appear when known: from the
task's log context (:mod:`ferry.core.log_context`) or from a logger
adapter's extras (a VM's logger). A move's ``job`` is the same id on both
hosts, so ``grep`` (or ``jq 'select(.job == ID)'``) on both logs follows it
from start to end. ``exc`` holds a traceback when there is one. Lines go to
stderr, which journald (or the lab's agent.log) keeps.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Literal

from ferry.core.log_context import FIELDS, current

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages are escaped)."""

    def __init__(self, host: str) -> None:
        super().__init__()
        self.host = host

    def format(self, record: logging.LogRecord) -> str:
        at = dt.datetime.fromtimestamp(record.created, dt.UTC)
        event: dict[str, object] = {
            "ts": at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "host": self.host,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        context = current()
        for key in FIELDS:
            value = getattr(record, key, None) or context.get(key)
            if value:
                event[key] = str(value)
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return json.dumps(event, ensure_ascii=False, default=str)


def configure_logging(log_format: LogFormat, *, host: str, level: int = logging.INFO) -> None:
    """Replace the root logger's handlers with one stderr handler in ``log_format``."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(host))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
