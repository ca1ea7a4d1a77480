"""What a log line is about (``vm``, ``job``, ``peer``), carried by ``contextvars``.

A job's task binds its VM and job id once; everything it logs, and every
task it starts, carries them, without threading a logger through every
call. The job id of a move is the same on both hosts (the destination
adopts the source's id), so ``job`` follows one move across both agents'
logs. The JSON log format (:mod:`ferry.host.log_format`) writes the fields.
Each asyncio task runs in its own copy of the context, so binding in one
task (a job, a request) never leaks into another.
"""

from __future__ import annotations

from collections.abc import Coroutine, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, TypeVar

T = TypeVar("T")

FIELDS = ("vm", "vm_uuid", "job", "kind", "peer")

_EMPTY: Mapping[str, str] = MappingProxyType({})
_fields: ContextVar[Mapping[str, str]] = ContextVar("ferry_log_fields", default=_EMPTY)


def bind(**fields: str | None) -> None:
    """Add fields (None: leave as it is) to the current task's log context."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown log fields {sorted(unknown)}; known: {FIELDS}")
    given = {key: value for key, value in fields.items() if value}
    if given:
        _fields.set(MappingProxyType({**_fields.get(), **given}))


def current() -> Mapping[str, str]:
    return _fields.get()


async def bound(work: Coroutine[Any, Any, T], **fields: str | None) -> T:
    """Run ``work`` with ``fields`` bound: ``create_task(bound(run(job), job=job.id))``."""
    bind(**fields)
    return await work
