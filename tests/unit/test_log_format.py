"""JSON log lines: one event per line, with the task's vm/job/peer fields."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from ferry.core import log_context
from ferry.host.log_format import JsonFormatter


def _line(logger: logging.Logger | logging.LoggerAdapter[logging.Logger], msg: str,
          *args: object) -> dict[str, object]:  # fmt: skip
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    base = logger.logger if isinstance(logger, logging.LoggerAdapter) else logger
    handler = Keep()
    base.addHandler(handler)
    base.setLevel(logging.INFO)
    try:
        logger.info(msg, *args)
    finally:
        base.removeHandler(handler)
    (record,) = records
    text = JsonFormatter("host-1").format(record)
    assert "\n" not in text
    event: dict[str, object] = json.loads(text)
    return event


def test_fields_from_the_task_context_stay_in_that_task() -> None:
    log = logging.getLogger("ferry.test.logfmt")

    async def job(name: str) -> dict[str, object]:
        log_context.bind(vm=name, job=f"job-{name}", peer=None)
        await asyncio.sleep(0)
        return _line(log, "line\nwith %s", "two lines")

    async def main() -> list[dict[str, object]]:
        return list(await asyncio.gather(job("a"), job("b")))

    a, b = asyncio.run(main())
    assert a["vm"] == "a" and a["job"] == "job-a" and "peer" not in a
    assert b["vm"] == "b" and b["job"] == "job-b"
    assert a["msg"] == "line\nwith two lines" and a["level"] == "INFO"
    assert a["host"] == "host-1" and a["logger"] == "ferry.test.logfmt"
    assert str(a["ts"]).endswith("Z")
    assert "vm" not in _line(log, "outside any job")


def test_adapter_extras_and_bound() -> None:
    adapter = logging.LoggerAdapter(logging.getLogger("ferry.test.vm"),
                                    {"vm": "vm1", "vm_uuid": "u-1"})  # fmt: skip
    event = _line(adapter, "started")
    assert event["vm"] == "vm1" and event["vm_uuid"] == "u-1"

    async def work() -> dict[str, object]:
        return _line(logging.getLogger("ferry.test.bound"), "moving")

    event = asyncio.run(log_context.bound(work(), job="j1", peer="host-2"))
    assert event["job"] == "j1" and event["peer"] == "host-2"
    with pytest.raises(ValueError, match="unknown log fields"):
        log_context.bind(colour="red")
