"""Browser tests: ``ferry web`` as a subprocess and Debian's chromium driven by Playwright.

Playwright's Python wheel brings its own driver (node); the browser is the
system's ``/usr/bin/chromium`` (``scripts/bootstrap.sh`` installs it), never one
downloaded by ``playwright install``. Every process these fixtures start (the
web server, the driver, chromium and its helpers) is ended by pid in a
finalizer and checked gone.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.conftest import LabEnv, _lab_processes

CHROMIUM = Path("/usr/bin/chromium")
FERRY = (sys.executable, "-m", "ferry")
URL = re.compile(r"(http://127\.0\.0\.1:(\d+)/\S*)")


def children_of(root: int) -> set[int]:
    """Every live descendant of process ``root`` (read from /proc, parent links)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def end(pids: set[int], grace: float = 10) -> list[int]:
    """SIGTERM each pid, SIGKILL what is left after ``grace``; the pids that needed it."""
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    stubborn = [pid for pid in pids if alive(pid)]
    for pid in stubborn:
        os.kill(pid, signal.SIGKILL)
    return stubborn


@dataclass
class WebServer:
    url: str  # the printed URL, one-time token included
    base: str  # http://127.0.0.1:PORT
    process: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where this module's screenshots and server logs go (printed in the summary)."""
    return tmp_path_factory.mktemp("web-artifacts")


@pytest.fixture(scope="module")
def web_server(lab_env: LabEnv, artifacts: Path) -> Iterator[WebServer]:
    """``ferry web --listen 127.0.0.1:0 --no-browser`` against the lab's $FERRY_HOME."""
    out, log = artifacts / "ferry-web.stdout", artifacts / "ferry-web.stderr"
    env = dict(os.environ, FERRY_HOME=str(lab_env.home))
    env.pop("FERRY_DEBUG", None)
    with out.open("wb") as stdout, log.open("wb") as stderr:
        process = subprocess.Popen(
            # Lag sampled every 2 s (5 s by default) so the plot grows within the test.
            [*FERRY, "web", "--listen", "127.0.0.1:0", "--no-browser", "--lag-sample", "2s"],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=env,
        )
    try:
        deadline = time.monotonic() + 30
        match = None
        while match is None:
            match = URL.search(out.read_text())
            if match is None:
                assert process.poll() is None, f"ferry web exited: {log.read_text()[-2000:]}"
                assert time.monotonic() < deadline, f"no URL from ferry web: {out.read_text()!r}"
                time.sleep(0.1)
        yield WebServer(match[1], f"http://127.0.0.1:{match[2]}", process, log)
    finally:
        # Ctrl-C is how an admin stops it; it must end on that alone.
        if process.poll() is None:
            os.kill(process.pid, signal.SIGINT)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            raise AssertionError("ferry web did not stop on SIGINT") from None


@pytest.fixture(scope="module")
def browser(lab_env: LabEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """Debian's chromium, headless, through Playwright; gone afterwards, helpers included.

    Made after the lab and ended before it: Playwright's sync API holds a
    running event loop, so no ``asyncio.run`` (the lab's up and down,
    ``LabEnv.console``) may happen while it lives; the tests use the CLI.
    """
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/bootstrap.sh (installs Debian chromium)")
    # Chromium's config and crash reports (its crashpad handler leaves the process
    # tree, but names this dir) stay out of ~/.config.
    home = tmp_path_factory.mktemp("chromium")
    env: dict[str, str | float | bool] = {**os.environ, "XDG_CONFIG_HOME": str(home / "config"),
                                          "XDG_CACHE_HOME": str(home / "cache")}  # fmt: skip

    def started() -> set[int]:
        return (children_of(os.getpid()) - before) | set(_lab_processes(home))

    before = children_of(os.getpid())
    playwright = sync_playwright().start()
    mine: set[int] = set()
    try:
        # Root cannot use chromium's sandbox; the pages opened are on 127.0.0.1 only.
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), env=env,
                                              args=["--no-sandbox"])  # fmt: skip
        try:
            mine = started()
            yield launched
        finally:
            mine |= started()
            launched.close()
    finally:
        mine |= started()
        playwright.stop()
        # Only what this fixture started: the driver, chromium and its helpers.
        stubborn = end({pid for pid in mine if _is_browser(pid)}, grace=5)
        assert not stubborn, f"chromium or the Playwright driver outlived close(): {stubborn}"


def _is_browser(pid: int) -> bool:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    return any(name in argv0 for name in (b"chrom", b"node", b"playwright"))


def save_screenshots(shots: list[Path]) -> None:
    """Copy the screenshots to $FERRY_SCREENSHOTS when it names a directory."""
    target = os.environ.get("FERRY_SCREENSHOTS")
    if not target:
        return
    Path(target).mkdir(parents=True, exist_ok=True)
    for shot in shots:
        shutil.copy2(shot, Path(target) / shot.name)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Name the screenshot directories the browser tests wrote (also under xdist)."""
    dirs = sorted({str(value) for reports in terminalreporter.stats.values()
                   for report in reports
                   for name, value in getattr(report, "user_properties", ())
                   if name == "web_artifacts"})  # fmt: skip
    for path in dirs:
        terminalreporter.write_line(f"web console screenshots and logs: {path}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item, so a fixture can see that its test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
