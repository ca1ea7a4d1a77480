"""ferry vm vnc --listen on a port that is taken: one clear line, not an internal error."""

import asyncio
import socket
from typing import cast

import pytest

from ferry.client.fleet import Fleet
from ferry.client.vnc import VncForward
from ferry.errors import InvalidInputError


def test_a_busy_listen_port_is_refused_in_one_line() -> None:
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        forward = VncForward(cast(Fleet, None), "web", None)  # start() never asks the fleet
        with pytest.raises(InvalidInputError) as refused:
            asyncio.run(forward.start("127.0.0.1", port))
        message = str(refused.value)
        assert message.startswith(f"--listen 127.0.0.1:{port}: Address already in use")
        assert "port 0 picks a free one" in message and "\n" not in message
    finally:
        held.close()


def test_a_free_port_listens() -> None:
    async def go() -> int:
        forward = VncForward(cast(Fleet, None), "web", None)
        try:
            return await forward.start("127.0.0.1", 0)
        finally:
            await forward.close()

    assert asyncio.run(go()) > 0
