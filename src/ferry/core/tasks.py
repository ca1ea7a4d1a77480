"""Stopping asyncio tasks without swallowing the caller's own cancellation.

``task.cancel()`` followed by ``with suppress(CancelledError): await task``
looks right but is not: if the task that waits is cancelled meanwhile (an
agent shutting down, an admin cancelling a job), its CancelledError arrives
through the same ``await`` and is suppressed too, so the caller runs on as if
nothing had happened. :func:`cancel_and_wait` tells the two apart by the
caller's count of cancellation requests (``Task.cancelling()``), the way
``asyncio.timeout`` does. No I/O: only the event loop's bookkeeping.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Task[Any]) -> None:
    """Cancel ``tasks`` and wait until each has ended.

    A task that ends cancelled did what was asked; an exception it ends with
    instead propagates (as ``await task`` would raise it). If the caller is
    asked to cancel before or while it waits, that CancelledError propagates:
    it is never taken for one of the tasks' own. A cancellation the caller is
    already handling (this runs in its ``finally`` or ``except``) counts as
    delivered, so cleanup that stops several tasks in turn runs to the end.
    """
    current = asyncio.current_task()
    before = current.cancelling() if current is not None else 0
    for task in tasks:
        task.cancel()
    if before:
        # A request made but not yet delivered would be handed on to the first
        # task awaited below and be lost there: let it arrive here. One that
        # was delivered already does not arrive again.
        await asyncio.sleep(0)
    for task in tasks:
        try:
            await task
        except asyncio.CancelledError:
            if current is not None and current.cancelling() > before:
                raise
