"""Server-sent events: one long GET answered as ``text/event-stream``.

A few lines over aiohttp's StreamResponse rather than a dependency. Each
event is ``event: NAME`` and its data, one ``data:`` line per line of it; a
comment line every ``KEEPALIVE_S`` keeps proxies and the browser from
closing an idle stream. The stream ends when the browser goes away (the write
fails) or the server stops (the handler is cancelled).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from aiohttp import web

KEEPALIVE_S = 15.0


def encode(event: str, data: str) -> bytes:
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"event: {event}\n{lines}\n".encode()


async def stream(
    request: web.Request, events: AsyncGenerator[tuple[str, str] | None, None]
) -> web.StreamResponse:
    """Send what ``events`` yields; it yields ``None`` when it has nothing new."""
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-store",
        "X-Accel-Buffering": "no"})  # fmt: skip
    await response.prepare(request)
    quiet_since = time.monotonic()
    try:
        async for item in events:
            if item is not None:
                await response.write(encode(*item))
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > KEEPALIVE_S:
                await response.write(b": keepalive\n\n")
                quiet_since = time.monotonic()
    except ConnectionResetError:  # the browser left; aiohttp's reset error is one too
        pass
    finally:
        await events.aclose()  # its polling ends with the stream
    return response
