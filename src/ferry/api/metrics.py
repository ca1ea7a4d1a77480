"""``GET /metrics``: the agent's Prometheus text, on the admin port and on an optional plain one.

On the agent's HTTPS port the route sits behind the edge's guard like every
admin endpoint (:mod:`ferry.api.edge`): an admin certificate may scrape, a
host certificate is answered 403. ``metrics_listen`` in host.toml adds a
plain-HTTP listener that serves only ``/metrics``; it has no authentication,
so the host config accepts only a loopback address for it (a local
Prometheus or node agent scrapes it).
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from ferry.errors import ConfigError

# The classic text format (0.0.4), which every Prometheus and scraper reads: the
# names are plain [a-z_] ones, so the output is the same as 1.0.0's without escaping.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


class MetricsRoutes:
    """The one route over one agent's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/metrics", self.metrics)]

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def serve_plain(registry: CollectorRegistry, address: str, port: int) -> web.AppRunner:
    """Serve ``GET /metrics`` in plain HTTP on ``address:port`` (a loopback address)."""
    app = web.Application()
    app.add_routes(MetricsRoutes(registry).routes())
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, address, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen for metrics on {address}:{port}: "
                          f"{exc.strerror}") from exc  # fmt: skip
    return runner
