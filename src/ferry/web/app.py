"""The web console's aiohttp application: the security edge, static files and the pages.

A client like the CLI: every page reads, and every action calls, the agents
through :class:`ferry.web.operations.Operations` (the same agent calls as the
CLI commands, over the admin certificate the browser never sees).

Contract with the browser tests (tests/e2e/test_web.py) and the vendored assets:
stable hooks are ``data-testid`` attributes (ids where the page links to them).
Keep these names; add freely.

  Assets (static/vendor/, by W2):  htmx.min.js, htmx-sse.js, xterm/xterm.js,
      xterm/xterm.css, xterm/addon-fit.js, uplot/uPlot.iife.min.js, uplot/uPlot.min.css;
      ours: static/ferry.css, static/ferry.js.
  Entry: ``ferry web --no-browser --listen 127.0.0.1:0`` prints one line on stdout,
      ``http://127.0.0.1:PORT/?token=...``; opening it sets the cookie and redirects
      to ``/``. A second use of the URL gets 403 (the token is spent).
  Every page: nav links ``nav-overview`` (/), ``nav-vms`` (/vms), ``nav-jobs`` (/jobs);
      the page's ``<h1>`` has ``data-testid="page-title"``.
  Action results: every action form answers into ``#action-result``
      (``data-testid="action-result"``): a refusal is one line
      ``<p role="alert" data-testid="action-error">``, success
      ``<p role="status" data-testid="action-ok">``; while it runs,
      ``action-pending`` (and the form's button is disabled). Destructive actions
      (stop, kill, move, remove replication, every failover but test/stop-test)
      ask first with the browser's ``confirm()`` (htmx ``hx-confirm``): accept
      the dialog (Playwright ``page.on("dialog", lambda d: d.accept())``).
      An action that starts a job (move, export, failovers) adds ``job-outcome``
      below its line, live: ``job-outcome-running``, then ``job-outcome-done`` or
      ``job-outcome-error`` (role="alert", the job's error).
  Overview (/): ``hosts-table``; rows ``host-row`` with ``data-host=NAME`` and
      ``data-up=1|0``; cells ``host-level``, ``host-accel``, ``host-networks``;
      ``alerts`` (list; items ``alert-item``, or ``no-alerts``); ``clusters`` only
      when an agent has one.
  VMs (/vms): ``vms-table``; rows ``vm-row`` with ``data-vm``, ``data-host``,
      ``data-state``; the name cell is a link ``vm-link`` to the VM page.
  VM page (/vms/NAME, ``?host=H`` for a replica copy): ``vm-state``, ``vm-host``,
      ``vm-config-version``, ``vm-replication``; buttons ``action-start``, ``action-stop``,
      ``action-kill``;
      move: select ``move-to`` (label "Destination host"; hosts that cannot take the
      VM are disabled options), list ``move-targets`` with items ``move-target`` /
      ``data-host`` / ``data-ok=1|0`` saying why not, button ``action-move``;
      export: input ``export-to``, checkbox ``export-live``, button ``action-export``;
      disks ``disks-table``; serial console ``console`` (xterm.js; its text is also
      kept, last 300 lines, in the visually hidden ``console-text`` <pre>);
      replication panel ``replication`` with ``repl-state``, ``repl-health``,
      ``repl-lag``, ``repl-cycles`` ("ok / missed / failed"), lag plot ``lag-plot``
      whose ``data-samples`` attribute counts the plotted points, recovery points
      ``points-table`` (rows ``point-row``); not replicated: select ``repl-replica``,
      select ``repl-frequency``, button ``action-repl-enable``; replicated:
      ``action-repl-pause``, ``action-repl-resume``, ``action-repl-remove``,
      ``action-failover-test``, ``action-failover-stop-test``,
      ``action-failover-planned``, ``action-failover-start`` (checkbox
      ``failover-force``; its warnings in ``failover-warnings``),
      ``action-failover-complete``, ``action-failover-cancel``; while <VM>-test
      exists, ``test-failover-running`` names it;
      the VM's jobs ``vm-jobs`` (job rows as below, live).
      Graphical console (only when the VM view has ``vnc`` true): section ``vnc``,
      noVNC's screen ``vnc-screen`` (``data-state`` connecting|connected|disconnected),
      its line ``vnc-status``; the websocket is ``/vms/NAME/vnc``.
  Jobs (/jobs): ``jobs-table``, live body ``jobs-body``; rows ``job-row`` with
      ``data-job-id``, ``data-kind``, ``data-vm``, ``data-state`` (``done`` at the end);
      inside: ``<progress data-testid="job-progress">``, ``job-phase``,
      ``job-bytes``, ``job-rate``, ``job-result`` (a done job's figures) holding
      ``job-error`` when it failed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from ferry.web import context
from ferry.web.operations import Operations
from ferry.web.pages import jobs as jobs_page
from ferry.web.pages import overview as overview_page
from ferry.web.pages import vm as vm_page
from ferry.web.pages import vms as vms_page
from ferry.web.pages import vnc as vnc_page
from ferry.web.render import Renderer
from ferry.web.sampler import LagSampler
from ferry.web.session import Session, Sessions, cookie_name

STATIC = Path(__file__).parent / "static"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Scripts only from here (no inline script, no eval); xterm.js and uPlot set
# element styles, so inline styles are allowed.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'"
)
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


@dataclass
class Origin:
    """Where the console listens; known once the socket is bound (port 0 picks one)."""

    host: str = "127.0.0.1"
    port: int = 0
    extra_hosts: set[str] = field(default_factory=set)

    @property
    def hosts(self) -> set[str]:
        """``Host`` headers this server answers (a rebinding attack sends another)."""
        names = {self.host, *self.extra_hosts}
        if self.host in ("127.0.0.1", "::1", "localhost"):
            names |= {"127.0.0.1", "localhost"}
        return {f"{name}:{self.port}" for name in names} | {
            f"[{name}]:{self.port}" for name in names if ":" in name
        }

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def _refuse(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=f"ferry web: {message}\n", content_type="text/plain")


@web.middleware
async def security(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Host check, token -> cookie, session, Origin and CSRF on every unsafe method."""
    origin: Origin = request.app[context.ORIGIN]
    sessions: Sessions = request.app[context.SESSIONS]
    if request.host not in origin.hosts:
        return _refuse(400, f"unexpected Host {request.host!r}; open the URL ferry web printed")
    if request.path.startswith("/static/"):
        return await handler(request)
    name = cookie_name(origin.port)
    if request.path == "/" and "token" in request.query:
        fresh = sessions.redeem(request.query["token"])
        if fresh is not None:
            reply = web.HTTPSeeOther("/")
            reply.set_cookie(name, fresh.id, httponly=True, samesite="Strict", path="/")
            raise reply
    session = sessions.find(request.cookies.get(name))
    if session is None:
        return _refuse(
            403,
            "this link was used already or has no token; run 'ferry web' again "
            "and open the URL it prints",
        )
    if request.method not in _SAFE_METHODS:
        refusal = await _unsafe_refusal(request, session, origin)
        if refusal is not None:
            return _refuse(403, refusal)
    request[context.SESSION] = session
    return await handler(request)


async def _unsafe_refusal(request: web.Request, session: Session, origin: Origin) -> str | None:
    sent_origin = request.headers.get("Origin")
    if sent_origin is None or sent_origin.removeprefix("http://") not in origin.hosts:
        return f"request from another origin ({sent_origin or 'none'}) refused"
    token = request.headers.get("X-CSRF-Token")
    if token is None and request.content_type in (
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ):
        token = str((await request.post()).get("csrf") or "") or None
    if not session.csrf_ok(token):
        return "missing or wrong CSRF token; reload the page"
    return None


async def _headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("Content-Security-Policy", _CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("X-Frame-Options", "DENY")
    if not request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-store")


def build_app(
    ops: Operations,
    sessions: Sessions,
    *,
    origin: Origin | None = None,
    sampler: LagSampler | None = None,
) -> web.Application:
    """The console over ``ops``; ``origin`` is filled in by the caller once bound."""
    app = web.Application(middlewares=[security])
    app[context.OPS] = ops
    app[context.SESSIONS] = sessions
    app[context.ORIGIN] = origin or Origin()
    app[context.RENDERER] = Renderer()
    app[context.SAMPLER] = sampler or LagSampler(ops)
    app.on_response_prepare.append(_headers)
    app.router.add_static("/static/", STATIC)
    for page in (overview_page, vms_page, vm_page, jobs_page, vnc_page):
        app.add_routes(page.routes())

    async def sampling(app: web.Application) -> AsyncIterator[None]:
        await app[context.SAMPLER].start()
        yield
        await app[context.SAMPLER].stop()

    app.cleanup_ctx.append(sampling)
    return app
