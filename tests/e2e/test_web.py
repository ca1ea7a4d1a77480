"""The web console in a real browser against a real lab: what an admin does, click by click.

One lab of two hosts, one ``ferry web`` and one chromium for the module; the
tests run in order on one page, as one session of an admin: open the printed
URL, see the hosts and the VM, start it and read its serial console, move it
and watch the job reach done, replicate it and watch the lag plot grow, rehearse
a failover and end it, and see a refused action as one line. The hooks are the
``data-testid`` names listed at the top of ``src/ferry/web/app.py``.

Screenshots of each page go to the module's artifact directory (named in the
pytest summary); with ``FERRY_SCREENSHOTS=DIR`` the README's two are copied
there too: ``FERRY_SCREENSHOTS=docs/screenshots pytest tests/e2e`` refreshes them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Dialog, FloatRect, Locator, Page, expect

from tests.conftest import LabEnv
from tests.e2e.conftest import WebServer, save_screenshots

pytestmark = pytest.mark.integration

VM = "web1"
SEQ_LINE = re.compile(r"seq \d+")
BOOT = 120_000  # ms: the test guest boots under TCG on a shared 2-core machine
JOB = 120_000


@pytest.fixture(scope="module")
def vm(lab_env: LabEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The test guest on host-1, off; each host accepts replication from the other."""
    replicas = tmp_path_factory.mktemp("replicas")
    for me, other in (("host-1", "host-2"), ("host-2", "host-1")):
        lab_env.cli("replica-server", "enable", "--host", me, "--storage", str(replicas / me),
                    "--allow", other)  # fmt: skip
    lab_env.cli("vm", "create", VM, "--host", "host-1", "--guest", "test", "--memory", "128M",
                "--disk", "64M")  # fmt: skip
    yield VM  # lab_env's teardown kills every VM of the lab


@pytest.fixture(scope="module")
def script_errors() -> list[str]:
    """What the page's scripts threw or logged as errors (a CSP refusal logs one too)."""
    return []


@pytest.fixture(scope="module")
def dialogs() -> list[tuple[str, str]]:
    """The dialogs the tab showed and the admin accepted, as (type, message)."""
    return []


@pytest.fixture(scope="module")
def page(browser: Browser, web_server: WebServer, vm: str, script_errors: list[str],
         dialogs: list[tuple[str, str]]) -> Iterator[Page]:  # fmt: skip
    """One admin's tab: destructive actions' confirm() dialogs are recorded and accepted."""
    context = browser.new_context(viewport={"width": 1180, "height": 760})
    context.set_default_timeout(20_000)
    tab = context.new_page()

    def accept(dialog: Dialog) -> None:
        dialogs.append((dialog.type, dialog.message))
        dialog.accept()

    tab.on("dialog", accept)
    tab.on("pageerror", lambda exc: script_errors.append(f"{tab.url}: {exc}"))
    tab.on("console", lambda msg: script_errors.append(f"{tab.url}: {msg.text}")
           if msg.type == "error" else None)  # fmt: skip
    try:
        yield tab
    finally:
        context.close()


@pytest.fixture(autouse=True)
def named_artifacts(
    artifacts: Path, record_property: Callable[[str, object], None], request: pytest.FixtureRequest
) -> Iterator[None]:
    """The artifact directory in the summary; when a test fails, a screenshot of the
    page, and the overview loaded again so that the next test starts from a page."""
    record_property("web_artifacts", str(artifacts))  # printed by tests/e2e/conftest.py
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed and "page" in request.fixturenames:
        tab: Page = request.getfixturevalue("page")
        tab.screenshot(path=artifacts / f"FAILED-{request.node.name}.png")
        tab.goto(request.getfixturevalue("web_server").base + "/")


def shoot(tab: Page, artifacts: Path, name: str, *, upto: Locator | None = None,
          part: Locator | None = None, readme: bool = False) -> Path:  # fmt: skip
    """A screenshot kept as an artifact: the whole page (as tall as its content), its
    top down to the bottom of ``upto``, or only ``part`` (with a margin); the
    README's are also copied to $FERRY_SCREENSHOTS."""
    path = artifacts / f"{name}.png"
    size = tab.viewport_size
    assert size is not None
    tab.set_viewport_size({"width": size["width"], "height": 240})
    try:
        clip: FloatRect | None = None
        tab.evaluate("window.scrollTo(0, 0)")  # boxes below are then page coordinates
        target = upto if upto is not None else part
        if target is not None:
            box = target.bounding_box()
            assert box is not None, f"{target} is not on the page"
            top = 0 if upto is not None else max(0, box["y"] - 16)
            clip = {"x": 0, "y": top, "width": size["width"],
                    "height": box["y"] + box["height"] + 16 - top}  # fmt: skip
        tab.screenshot(path=path, full_page=True, clip=clip, animations="disabled")
    finally:
        tab.set_viewport_size(size)
    if readme:
        save_screenshots([path])
    return path


def act(tab: Page, testid: str, dialogs: list[tuple[str, str]], *, destructive: bool = False,
        refused: bool = False) -> str:  # fmt: skip
    """Press an action's button and wait for its answer; its one line (ok, or the
    refusal when ``refused``), read after that answer, never an earlier one. A
    ``destructive`` action must have asked first (one confirm dialog), another must not."""
    # htmx (a deferred script) must have taken the form over, or the click posts it plainly.
    tab.wait_for_function("() => document.readyState === 'complete' && window.htmx !== undefined")
    before = len(dialogs)
    with tab.expect_response(lambda r: "/actions/" in r.url and r.request.method == "POST",
                             timeout=JOB):  # fmt: skip
        tab.get_by_test_id(testid).click()
    asked = dialogs[before:]
    if destructive:
        assert [kind for kind, _ in asked] == ["confirm"], f"{testid} did not ask: {asked}"
        assert asked[0][1].strip(), f"{testid} asked nothing in words"
    else:
        assert asked == [], f"{testid} asked: {asked}"
    result = tab.get_by_test_id("action-result")
    expected, other = ("action-error", "action-ok") if refused else ("action-ok", "action-error")
    expect(result.get_by_test_id(expected).or_(result.get_by_test_id(other))).to_be_visible()
    unexpected = result.get_by_test_id(other)
    assert unexpected.count() == 0, f"{testid}: {unexpected.inner_text()}"
    return result.get_by_test_id(expected).inner_text().strip()


def job_done(tab: Page, kind: str) -> Locator:
    """On the jobs page, the newest ``kind`` job of the VM once it is done."""
    tab.get_by_test_id("nav-jobs").click()
    job = tab.locator(f'[data-testid="job-row"][data-vm="{VM}"][data-kind="{kind}"]').first
    expect(job).to_have_attribute("data-state", "done", timeout=JOB)
    return job


def watch(job: Locator, timeout_s: float = JOB / 1000) -> list[tuple[str, str, str]]:
    """What a job row showed, (state, phase, bar value) each time it changed, until
    it is final; the page is not reloaded meanwhile (the rows arrive over SSE)."""
    seen: list[tuple[str, str, str]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = (job.get_attribute("data-state") or "",
               job.get_by_test_id("job-phase").inner_text().strip(),
               job.get_by_test_id("job-progress").get_attribute("value") or "")  # fmt: skip
        if not seen or seen[-1] != now:
            seen.append(now)
        if now[0] in ("done", "failed", "cancelled"):
            break
        job.page.wait_for_timeout(200)
    return seen


def open_vm(tab: Page, name: str, host: str = "host-1") -> None:
    """The VM's page through the VMs list (a replicated VM has a row per host)."""
    tab.get_by_test_id("nav-vms").click()
    row = tab.locator(f'[data-testid="vm-row"][data-vm="{name}"][data-host="{host}"]')
    row.get_by_test_id("vm-link").click()
    expect(tab.get_by_test_id("page-title")).to_contain_text(name)


def test_token_url_opens_a_session_once(
    page: Page, browser: Browser, web_server: WebServer, artifacts: Path
) -> None:
    """The printed URL logs in (HttpOnly, SameSite=Strict cookie); its token then is spent."""
    assert "token=" in web_server.url
    page.goto(web_server.url)
    assert page.url == f"{web_server.base}/"
    (cookie,) = page.context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert web_server.url.split("token=", 1)[1] not in cookie["value"]

    stranger = browser.new_context()
    try:
        again = stranger.new_page().goto(web_server.url)
        assert again is not None and again.status == 403
    finally:
        stranger.close()

    hosts = page.get_by_test_id("hosts-table")
    for name in ("host-1", "host-2"):
        row = hosts.locator(f'[data-testid="host-row"][data-host="{name}"]')
        expect(row).to_have_attribute("data-up", "1")
        expect(row.get_by_test_id("host-level")).not_to_be_empty()
        expect(row.get_by_test_id("host-accel")).to_contain_text(re.compile("tcg|kvm"))
    expect(page.get_by_test_id("alerts").or_(page.get_by_test_id("no-alerts"))).to_be_visible()
    shoot(page, artifacts, "overview")


def test_vms_page_lists_the_vm(page: Page, artifacts: Path) -> None:
    page.get_by_test_id("nav-vms").click()
    row = page.locator(f'[data-testid="vm-row"][data-vm="{VM}"]')
    expect(row).to_have_attribute("data-host", "host-1")
    expect(row).to_have_attribute("data-state", "off")
    shoot(page, artifacts, "vms")


def test_start_shows_the_serial_console(page: Page, dialogs: list[tuple[str, str]]) -> None:
    """Start from the VM page; the guest's ``seq N`` lines arrive in xterm.js over SSE."""
    open_vm(page, VM)
    act(page, "action-start", dialogs)
    expect(page.get_by_test_id("vm-state")).to_contain_text("running", timeout=BOOT)
    expect(page.get_by_test_id("console-text")).to_contain_text(SEQ_LINE, timeout=BOOT)
    # The same lines are drawn by xterm.js itself, not only kept in the hidden text.
    expect(page.get_by_test_id("console").locator(".xterm-rows")).to_contain_text(SEQ_LINE)


def test_move_and_watch_the_job_reach_done(
    page: Page, lab_env: LabEnv, artifacts: Path, web_server: WebServer,
    dialogs: list[tuple[str, str]], script_errors: list[str],
) -> None:  # fmt: skip
    """The picker says why the VM's own host cannot take it; the jobs page, open (and
    subscribed to the job rows) before the move starts, sees the job run, then done
    with its bar full, without a reload."""
    own = page.locator('[data-testid="move-target"][data-host="host-1"]')
    expect(own).to_have_attribute("data-ok", "0")
    expect(own).not_to_be_empty()
    expect(page.locator('[data-testid="move-target"][data-host="host-2"]')
           ).to_have_attribute("data-ok", "1")  # fmt: skip
    page.get_by_label("Destination host").select_option("host-2")

    jobs = page.context.new_page()  # a second tab of the same session
    jobs.on("pageerror", lambda exc: script_errors.append(f"{jobs.url}: {exc}"))
    try:
        with jobs.expect_response(lambda r: "/jobs/events" in r.url, timeout=JOB):
            jobs.goto(web_server.base + "/jobs")  # the stream answered: subscribed
        expect(jobs.get_by_test_id("page-title")).to_have_text("Jobs")
        before = jobs.locator('[data-testid="job-row"]').evaluate_all(
            "rows => rows.map(row => row.dataset.jobId)"
        )
        line = act(page, "action-move", dialogs, destructive=True)
        found = re.search(r"\(job ([^)\s]+)\)", line)
        assert found, line
        job_id = found[1]
        assert job_id not in before, (job_id, before)
        job = jobs.locator(f'[data-testid="job-row"][data-job-id="{job_id}"][data-kind="move"]')
        seen = watch(job)
        print("the move job as the jobs page showed it:", seen)
        assert seen[-1][0] == "done", seen
        if seen[0][0] == "done":
            # Done within one poll of the stream (a fast machine): the job's own record
            # must still show it ran through its phases before it was done.
            record = lab_env.cli.json("job", "show", job_id, "--host", "host-1")
            steps = [(step["state"], step.get("phase")) for step in record["history"]]
            print("the move job's recorded history:", steps)
            assert steps[-1][0] == "done" and len(steps) >= 3, steps
            assert any(state == "running" and phase for state, phase in steps[:-1]), steps
        else:  # seen running first: the row changed while the page stayed
            assert len(seen) >= 2, seen
        bar = job.get_by_test_id("job-progress")
        assert bar.get_attribute("value") == bar.get_attribute("max"), "the bar did not end full"
        shoot(jobs, artifacts, "jobs")
    finally:
        jobs.close()
    assert lab_env.vm(VM)["host"] == "host-2"


def test_replication_lag_plot_gains_points(
    page: Page, artifacts: Path, dialogs: list[tuple[str, str]]
) -> None:
    """Enable replication to host-1 from the VM page; the sampled lag plot grows."""
    open_vm(page, VM, "host-2")
    page.get_by_test_id("repl-replica").select_option("host-1")
    page.get_by_label("Frequency").select_option("30")  # seconds
    act(page, "action-repl-enable", dialogs)

    page.reload()
    panel = page.get_by_test_id("replication")
    expect(panel.get_by_test_id("repl-state")).not_to_be_empty(timeout=JOB)
    plot = panel.get_by_test_id("lag-plot")
    expect(plot).to_have_attribute("data-samples", re.compile(r"[1-9]\d*"), timeout=JOB)
    first = int(plot.get_attribute("data-samples") or 0)
    page.wait_for_function(
        "([el, n]) => Number(el.dataset.samples) > n",
        arg=[plot.element_handle(), first],
        timeout=JOB,
    )
    expect(plot.locator("canvas")).to_be_visible()
    expect(page.get_by_test_id("points-table").get_by_test_id("point-row").first).to_be_visible()
    shoot(page, artifacts, "vm")
    # The README's two: the top of the VM page down to its console, and its replication.
    shoot(page, artifacts, "vm-console", upto=page.get_by_test_id("console"), readme=True)
    shoot(page, artifacts, "vm-replication", part=panel, readme=True)


def test_test_failover_and_stop_it(
    page: Page, lab_env: LabEnv, dialogs: list[tuple[str, str]]
) -> None:
    """A drill boots ``web1-test`` on the replica host; stop-test asks, then removes it."""
    act(page, "action-failover-test", dialogs)
    job_done(page, "failover-test")
    drill = lab_env.vm(f"{VM}-test", "host-1")
    assert drill["state"] in ("starting", "running"), drill
    page.get_by_test_id("nav-vms").click()
    expect(page.locator(f'[data-testid="vm-row"][data-vm="{VM}-test"]')).to_be_visible()

    open_vm(page, VM, "host-2")
    act(page, "action-failover-stop-test", dialogs, destructive=True)
    assert f"{VM}-test" in dialogs[-1][1], dialogs[-1]
    job_done(page, "failover-stop-test")
    page.get_by_test_id("nav-vms").click()
    expect(page.locator(f'[data-testid="vm-row"][data-vm="{VM}-test"]')).to_have_count(0)
    lab_env.cli.fails("vm", "show", f"{VM}-test", "--host", "host-1")


def test_keyboard_and_labels(page: Page) -> None:
    """The pages work from the keyboard, and every control of the VM page has a name."""
    page.get_by_test_id("nav-overview").click()
    page.reload()  # focus at the start of the document
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    expect(page.get_by_test_id("nav-vms")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.get_by_test_id("page-title")).to_have_text("VMs")

    open_vm(page, VM, "host-2")
    unnamed = page.evaluate("""() => [...document.querySelectorAll(
            'main input:not([type=hidden]), main select, main button, main a[href]')]
        .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                      && !el.getAttribute('aria-labelledby') && !el.textContent.trim())
        .map(el => el.outerHTML.slice(0, 120))""")
    assert unnamed == [], unnamed


def test_refused_action_is_one_line(
    page: Page, lab_env: LabEnv, artifacts: Path, dialogs: list[tuple[str, str]]
) -> None:
    """An action the agent refuses (the VM was deleted behind the page) reads as one line."""
    lab_env.cli("vm", "create", "web2", "--host", "host-1", "--guest", "test", "--memory", "128M",
                "--disk", "16M")  # fmt: skip
    open_vm(page, "web2")
    lab_env.cli("vm", "delete", "web2", "--force")
    text = act(page, "action-start", dialogs, refused=True)
    error = page.get_by_test_id("action-result").get_by_test_id("action-error")
    expect(error).to_have_attribute("role", "alert")
    assert text and "\n" not in text and "Traceback" not in text, text
    assert "web2" in text, text
    shoot(page, artifacts, "refused", upto=page.get_by_test_id("action-result"))


def test_forged_post_is_refused(page: Page, web_server: WebServer, lab_env: LabEnv) -> None:
    """A POST without the page's CSRF token, or from another origin, changes nothing."""
    open_vm(page, VM, "host-2")
    form = page.locator("form", has=page.get_by_test_id("action-stop"))
    action = form.get_attribute("hx-post") or form.get_attribute("action")
    assert action, "the stop button's form names no URL"
    forged = page.context.request
    no_token = forged.post(web_server.base + action, headers={"Origin": web_server.base})
    assert no_token.status == 403, no_token.text()
    token = form.locator('input[name="csrf"]').get_attribute("value") or ""
    elsewhere = forged.post(web_server.base + action, form={"csrf": token},
                            headers={"Origin": "http://evil.example"})  # fmt: skip
    assert elsewhere.status == 403, elsewhere.text()
    assert lab_env.vm(VM)["state"] == "running"


PAINTER = "painter"  # a VM with a VNC display
LIT_PIXEL = """() => {
  const c = document.querySelector('[data-testid="vnc-screen"] canvas');
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  for (let i = 0; i < d.length; i += 4) if (d[i] > 128) return true;
  return false;
}"""


def test_graphical_console_shows_the_vnc_display(
    page: Page, web_server: WebServer, lab_env: LabEnv, artifacts: Path
) -> None:
    """A VM made with --display vnc: its page connects noVNC through the console's
    websocket (the agent's relay behind it) and draws the screen on a canvas."""
    # No disk and no kernel: SeaBIOS alone draws its text on the display, and the VM is
    # made and started at once (no guest to copy or boot).
    lab_env.cli("vm", "create", PAINTER, "--host", "host-1", "--memory", "64M",
                "--display", "vnc", "--start")  # fmt: skip
    try:
        open_vm(page, PAINTER)
        screen = page.get_by_test_id("vnc-screen")
        expect(screen).to_have_attribute("data-state", "connected", timeout=30_000)
        expect(page.get_by_test_id("vnc-status")).to_have_text("Connected.")
        canvas = screen.locator("canvas")
        expect(canvas).to_be_visible()
        size = canvas.evaluate("c => [c.width, c.height]")
        assert size[0] >= 640 and size[1] >= 200, size  # QEMU's VGA mode, not noVNC's blank
        # Not a blank canvas: the VM's screen (SeaBIOS's text) is drawn.
        page.wait_for_function(LIT_PIXEL, arg=None, timeout=30_000)
        shoot(page, artifacts, "vm-graphical-console", part=page.get_by_test_id("vnc"))
        # Only this console's pages may open the websocket (it bears the session cookie).
        forged = page.context.request.get(web_server.base + f"/vms/{PAINTER}/vnc",
                                          headers={"Origin": "http://evil.example"})  # fmt: skip
        assert forged.status == 403, forged.text()
        # A VM without a display has no panel.
        open_vm(page, VM, lab_env.vm(VM)["host"])
        expect(page.get_by_test_id("vnc")).to_have_count(0)
    finally:
        lab_env.cli("vm", "kill", PAINTER, check=False)
        lab_env.cli("vm", "delete", PAINTER, check=False)


def test_no_script_or_server_errors(script_errors: list[str], web_server: WebServer) -> None:
    """Through all of the above, no script failed, the page's policy refused nothing
    and the web server answered every request without a traceback."""
    assert script_errors == []
    log = web_server.log.read_text()
    assert "Traceback" not in log, log[-3000:]
