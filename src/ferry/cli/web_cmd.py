"""``ferry web``: the browser console, served on this machine until Ctrl-C."""

from __future__ import annotations

import asyncio
import sys

import typer

from ferry.cli.output import err
from ferry.core.units import parse_duration


def web(
    listen: str = typer.Option(
        "127.0.0.1:0", "--listen", help="ADDRESS:PORT to serve on (port 0: a free one)."
    ),
    no_browser: bool = typer.Option(False, "--no-browser", help="Only print the URL."),
    lag_sample: str = typer.Option(
        "5s", "--lag-sample", help="How often to sample replication lag for the plots."
    ),
) -> None:
    """Serve the web console; prints one URL with a one-time token, serves until Ctrl-C."""
    from ferry.client.settings import load_settings
    from ferry.web.serve import is_loopback, parse_listen, serve

    host, _ = parse_listen(listen)
    sample_s = float(parse_duration(lag_sample, what="lag sample interval"))
    if not is_loopback(host):
        err.print(f"ferry: warning: {host} is not loopback and the console speaks plain HTTP: "
                  "its token and cookie can be read on the network", markup=False)  # fmt: skip

    def announce(url: str) -> None:
        sys.stdout.write(url + "\n")
        sys.stdout.flush()
        err.print("ferry web: open the URL above (it works once); Ctrl-C stops", markup=False)

    asyncio.run(serve(load_settings(), listen, open_browser=not no_browser, sample_s=sample_s,
                      announce=announce))  # fmt: skip
