"""Byte pipes through websockets: a stream or another websocket on the far side.

The graphical console travels so: the agent joins a VM's VNC unix socket to
an admin's websocket (``GET /v1/vms/{name}/vnc``), ``ferry vm vnc`` joins a
local TCP connection to that websocket, and the web console joins the
browser's websocket to it. Bytes go as binary frames, unchanged; either side
closing ends both.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from aiohttp import web

from ferry.core.tasks import cancel_and_wait

WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse
CHUNK = 64 * 1024
# What a pipe does when its far side went away under it: it ends.
_GONE = (ConnectionError, aiohttp.ClientError, RuntimeError)


async def _ws_to_stream(ws: WebSocket, writer: asyncio.StreamWriter) -> None:
    async for message in ws:
        if message.type is aiohttp.WSMsgType.BINARY:
            writer.write(message.data)
            await writer.drain()
        elif message.type is aiohttp.WSMsgType.TEXT:
            writer.write(message.data.encode())
            await writer.drain()


async def _stream_to_ws(reader: asyncio.StreamReader, ws: WebSocket) -> None:
    while chunk := await reader.read(CHUNK):
        await ws.send_bytes(chunk)


async def _ws_to_ws(source: WebSocket, sink: WebSocket) -> None:
    async for message in source:
        if message.type is aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif message.type is aiohttp.WSMsgType.TEXT:
            await sink.send_str(message.data)


async def _first_to_end(*work: asyncio.Task[None]) -> None:
    """Wait until one pipe ends (its side closed or broke), then stop the other."""
    try:
        await asyncio.wait(work, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in work:
            with contextlib.suppress(*_GONE):
                await cancel_and_wait(task)


async def join_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      ws: WebSocket) -> None:  # fmt: skip
    """Pipe a byte stream and a websocket both ways until either closes."""
    try:
        await _first_to_end(
            asyncio.create_task(_ws_to_stream(ws, writer)),
            asyncio.create_task(_stream_to_ws(reader, ws)),
        )
    finally:
        writer.close()
        with contextlib.suppress(*_GONE, OSError):
            await writer.wait_closed()
        with contextlib.suppress(*_GONE):
            await ws.close()


async def join_websockets(a: WebSocket, b: WebSocket) -> None:
    """Pipe two websockets both ways until either closes."""
    try:
        await _first_to_end(asyncio.create_task(_ws_to_ws(a, b)),
                            asyncio.create_task(_ws_to_ws(b, a)))  # fmt: skip
    finally:
        for ws in (a, b):
            with contextlib.suppress(*_GONE):
                await ws.close()
