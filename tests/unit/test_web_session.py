"""The web console's edge: the one-time token, the session cookie, CSRF, Origin and Host checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ferry.errors import InvalidInputError
from ferry.web.serve import parse_listen
from ferry.web.session import Sessions, cookie_name
from tests.unit.web_fake import FakeFleet, vm_view
from tests.unit.web_harness import TOKEN, Console, run_console


def _fleet() -> FakeFleet:
    fleet = FakeFleet("host-1", "host-2")
    fleet.agents["host-1"].vms["g1"] = vm_view("g1", "host-1", state="off")
    return fleet


def test_the_launch_token_opens_one_session_and_is_spent() -> None:
    sessions = Sessions("tok")
    assert sessions.redeem("wrong") is None
    assert sessions.launch_token == "tok"  # a wrong guess does not spend it
    session = sessions.redeem("tok")
    assert session is not None and sessions.launch_token is None
    assert sessions.redeem("tok") is None
    assert sessions.find(session.id) is session
    assert sessions.find("other") is None and sessions.find(None) is None
    assert session.csrf_ok(session.csrf)
    assert not session.csrf_ok(None) and not session.csrf_ok(session.csrf + "x")
    assert session.id != session.csrf and len(session.id) >= 40


def test_cookie_names_differ_per_port() -> None:
    assert cookie_name(8080) != cookie_name(8081)


def test_the_token_url_sets_a_strict_httponly_cookie_then_the_token_is_spent() -> None:
    async def body(console: Console) -> None:
        client = console.client
        assert (await client.get("/")).status == 403  # no cookie yet
        reply = await client.get(f"/?token={TOKEN}", allow_redirects=False)
        assert reply.status == 303 and reply.headers["Location"] == "/"
        cookie = reply.headers["Set-Cookie"]
        assert cookie.startswith(cookie_name(client.port) + "=")
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        assert TOKEN not in cookie
        page = await client.get("/")  # the test client keeps the cookie
        assert page.status == 200
        assert page.headers["Content-Security-Policy"].startswith("default-src 'self'")
        assert page.headers["X-Frame-Options"] == "DENY"
        client.session.cookie_jar.clear()
        again = await client.get(f"/?token={TOKEN}", allow_redirects=False)
        assert again.status == 403
        assert "used already" in await again.text()

    run_console(_fleet(), body, sign_in=False)


def test_a_wrong_token_or_a_forged_cookie_gets_nothing() -> None:
    async def body(console: Console) -> None:
        client = console.client
        assert (await client.get("/?token=guess", allow_redirects=False)).status == 403
        client.session.cookie_jar.update_cookies({cookie_name(client.port): "forged"})
        assert (await client.get("/vms")).status == 403
        assert (await client.get("/jobs/events")).status == 403
        assert console.sessions.launch_token == TOKEN  # still usable by its owner

    run_console(_fleet(), body, sign_in=False)


def test_another_host_header_is_refused_even_with_a_session() -> None:
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends its own Host."""

    async def body(console: Console) -> None:
        reply = await console.client.get("/", headers={"Host": "evil.example:80"})
        assert reply.status == 400
        local = await console.client.get("/", headers={"Host": f"localhost:{console.client.port}"})
        assert local.status == 200

    run_console(_fleet(), body)


@pytest.mark.parametrize(
    ("headers", "form", "why"),
    [
        ({}, {"csrf": "SESSION"}, "another origin"),  # no Origin at all
        ({"Origin": "http://evil.example"}, {"csrf": "SESSION"}, "another origin"),
        ({"Origin": "ORIGIN"}, {}, "CSRF"),
        ({"Origin": "ORIGIN"}, {"csrf": "wrong"}, "CSRF"),
        ({"Origin": "ORIGIN", "X-CSRF-Token": "wrong"}, {}, "CSRF"),
    ],
)
def test_a_post_needs_this_origin_and_the_sessions_csrf_token(
    headers: dict[str, str], form: dict[str, str], why: str
) -> None:
    async def body(console: Console) -> None:
        sent = {k: console.origin if v == "ORIGIN" else v for k, v in headers.items()}
        data = {k: console.csrf if v == "SESSION" else v for k, v in form.items()}
        reply = await console.client.post("/vms/g1/actions/start", data=data, headers=sent)
        assert reply.status == 403
        assert why in await reply.text()
        assert console.fleet.actions() == []  # nothing reached an agent

    run_console(_fleet(), body)


def test_a_post_with_the_token_in_the_form_or_in_htmxs_header_is_served() -> None:
    async def body(console: Console) -> None:
        status, _ = await console.act("g1", "start")
        assert status == 200
        reply = await console.client.post(
            "/vms/g1/actions/kill",
            headers={"Origin": console.origin, "X-CSRF-Token": console.csrf, "HX-Request": "true"},
        )
        assert reply.status == 200
        assert [c[2] for c in console.fleet.actions()] == ["/v1/vms/g1/start", "/v1/vms/g1/kill"]

    run_console(_fleet(), body)


def test_pages_carry_the_csrf_token_but_nothing_of_the_admin_certificate() -> None:
    async def body(console: Console) -> None:
        for path in ("/", "/vms", "/vms/g1", "/jobs"):
            text = await console.page(path)
            assert console.csrf in text
            assert "PRIVATE KEY" not in text and "client-key" not in text

    run_console(_fleet(), body)


def test_static_files_are_served_without_a_session() -> None:
    async def body(console: Console) -> None:
        for path in ("/static/ferry.css", "/static/ferry.js", "/static/vendor/htmx.min.js"):
            assert (await console.client.get(path)).status == 200, path

    run_console(_fleet(), body, sign_in=False)


def test_listen_takes_one_address_and_a_port() -> None:
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:8080") == ("::1", 8080)
    assert parse_listen("localhost:80") == ("localhost", 80)
    for bad in ("8080", "0.0.0.0:80", "[::]:80", "example.com:80", "127.0.0.1:99999", "1.2.3.4:x"):
        with pytest.raises(InvalidInputError):
            parse_listen(bad)


def test_ferry_web_without_an_admin_certificate_says_so_in_one_line(tmp_path: Path) -> None:
    env = dict(os.environ, FERRY_HOME=str(tmp_path))
    env.pop("FERRY_DEBUG", None)
    result = subprocess.run(
        [sys.executable, "-m", "ferry", "web", "--no-browser"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("ferry: error: no admin certificate configured")
    assert len(result.stderr.strip().splitlines()) == 1


def test_ferry_web_binds_127_0_0_1_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ferry web`` with no ``--listen``: the URL names 127.0.0.1 and the socket is bound
    to that address only (127.0.0.2, loopback too, is refused: no wildcard bind)."""
    import signal
    import socket
    from urllib.parse import urlsplit

    from typer.testing import CliRunner

    import ferry.client.settings
    import ferry.web.serve
    from ferry.cli.main import app

    fleet = _fleet()
    seen: dict[str, object] = {}

    def reachable(address: str, port: int) -> bool:
        try:
            with socket.create_connection((address, port), timeout=5):
                return True
        except OSError:
            return False

    def browser(url: str) -> bool:  # runs in a thread while the console serves
        try:
            parts = urlsplit(url)
            assert parts.port is not None
            seen.update(url=url, host=parts.hostname,
                        on_127_0_0_1=reachable("127.0.0.1", parts.port),
                        on_127_0_0_2=reachable("127.0.0.2", parts.port))  # fmt: skip
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # serve's own handler: it stops
        return True

    monkeypatch.setattr(ferry.client.settings, "load_settings", lambda: fleet.settings)
    monkeypatch.setattr(ferry.web.serve, "Fleet", lambda settings, timeout: fleet)
    monkeypatch.setattr(ferry.web.serve, "has_display", lambda: True)
    monkeypatch.setattr(ferry.web.serve.webbrowser, "open", browser)
    result = CliRunner().invoke(app, ["web"])
    assert result.exit_code == 0, result.output
    assert seen["host"] == "127.0.0.1", seen
    assert result.stdout.strip() == seen["url"]
    assert seen["on_127_0_0_1"] is True and seen["on_127_0_0_2"] is False, seen
