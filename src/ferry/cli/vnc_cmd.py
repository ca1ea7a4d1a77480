"""``ferry vm vnc NAME``: a VM's graphical console as a local port, served until Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
import sys

import typer

from ferry.cli.output import err
from ferry.errors import InvalidInputError


def vnc(
    name: str = typer.Argument(..., help="The VM (made with --display vnc)."),
    host: str | None = typer.Option(None, "--host", "-H", help="The host, where ambiguous."),
    listen: str = typer.Option(
        "127.0.0.1:0", "--listen", help="Loopback ADDRESS:PORT for the viewer (port 0: free)."
    ),
) -> None:
    """Forward a local port to the VM's VNC display; prints vnc://ADDRESS:PORT."""
    from ferry.client.fleet import Fleet
    from ferry.client.settings import load_settings
    from ferry.client.vnc import VncForward, check_display
    from ferry.web.serve import is_loopback, parse_listen

    address, port = parse_listen(listen)
    if not is_loopback(address):
        raise InvalidInputError(
            f"--listen {listen}: the display is forwarded to loopback only (127.0.0.1:PORT)"
        )

    def warn(message: str) -> None:
        err.print(f"ferry vm vnc: {message}", markup=False)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        async with Fleet(load_settings()) as fleet:
            await check_display(fleet, name, host)
            forward = VncForward(fleet, name, host, on_error=warn)
            bound = await forward.start(address, port)
            shown = f"[{address}]" if ":" in address else address
            sys.stdout.write(f"vnc://{shown}:{bound}\n")
            sys.stdout.flush()
            err.print(f"ferry vm vnc: point a VNC viewer at {shown}:{bound} (e.g. "
                      f"'vncviewer {shown}::{bound}'); Ctrl-C stops", markup=False)  # fmt: skip
            try:
                await stop.wait()
            finally:
                await forward.close()

    asyncio.run(run())
