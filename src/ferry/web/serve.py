"""Running the console: bind, print the one-time URL, serve until stopped.

``--listen`` defaults to ``127.0.0.1:0`` (a free port; the printed URL shows
it). Another address is allowed (it must be one address, not a wildcard:
the server checks the ``Host`` header against it), but the console speaks
plain HTTP, so beyond loopback the token and cookie travel unencrypted; the
CLI warns.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import sys
import webbrowser
from collections.abc import Callable

from aiohttp import web

from ferry.client.fleet import Fleet
from ferry.client.settings import ClientSettings
from ferry.errors import InvalidInputError
from ferry.web.app import Origin, build_app
from ferry.web.operations import Operations
from ferry.web.sampler import LagSampler
from ferry.web.session import Sessions

# A page waits this long for a host that hangs; a stop (30 s, then forced) fits.
AGENT_TIMEOUT_S = 60.0


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port); one address, no wildcard."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
        address = ipaddress.ip_address(host if host != "localhost" else "127.0.0.1")
    except ValueError:
        raise InvalidInputError(
            f"--listen must be ADDRESS:PORT, e.g. 127.0.0.1:8080, not {text!r}"
        ) from None
    if not sep or not 0 <= port <= 65535:
        raise InvalidInputError(f"--listen must be ADDRESS:PORT, e.g. 127.0.0.1:8080, not {text!r}")
    if address.is_unspecified:
        raise InvalidInputError(f"--listen needs one address, not the wildcard {host!r}")
    return host, port


def has_display() -> bool:
    """A graphical browser can open: without one, ``webbrowser`` would run a text
    browser in this terminal, so the URL is only printed."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


async def serve(settings: ClientSettings, listen: str, *, open_browser: bool,
                sample_s: float, announce: Callable[[str], None]) -> None:  # fmt: skip
    """Serve the console until SIGINT/SIGTERM; ``announce`` gets the one-time URL."""
    host, port = parse_listen(listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with Fleet(settings, timeout=AGENT_TIMEOUT_S) as fleet:
        ops = Operations(fleet)
        sessions = Sessions()
        origin = Origin(host=host)
        app = build_app(ops, sessions, origin=origin,
                        sampler=LagSampler(ops, interval_s=sample_s))  # fmt: skip
        runner = web.AppRunner(app, access_log=None, handle_signals=False,
                               shutdown_timeout=1.0)  # fmt: skip
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            try:
                await site.start()
            except OSError as exc:
                raise InvalidInputError(f"cannot listen on {listen}: {exc.strerror}") from exc
            origin.port = int(runner.addresses[0][1])
            url = f"{origin.url}/?token={sessions.launch_token}"
            announce(url)
            if open_browser and has_display():
                await asyncio.to_thread(webbrowser.open, url)
            await stop.wait()
        finally:
            await runner.cleanup()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
