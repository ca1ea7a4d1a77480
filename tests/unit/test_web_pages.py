"""The web console's pages and actions over a fake fleet: what they show, what they call.

Each action must send the same agent request as its CLI command; a refusal
is one ``role="alert"`` line.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest

from ferry.errors import ConnectionFailedError, StateError
from ferry.web.pages.jobs import row as job_row
from ferry.web.pages.overview import alerts
from ferry.web.pages.vm import ACTIONS
from ferry.web.targets import move_targets
from tests.unit.web_fake import FakeFleet, host_facts, job, vm_view
from tests.unit.web_harness import Console, run_console

REPLICATED = {
    "role": "primary",
    "state": "replicating",
    "primary": "host-1",
    "replica": "host-2",
    "frequency_s": 30,
    "origin": None,
    "extended": None,
}


def _fleet(state: str = "running", hosts: tuple[str, ...] = ("host-1", "host-2"),
           **extra: Any) -> FakeFleet:  # fmt: skip
    fleet = FakeFleet(*hosts)
    fleet.agents["host-1"].vms["g1"] = vm_view("g1", "host-1", state=state, **extra)
    return fleet


def _replicated(hosts: tuple[str, ...] = ("host-1", "host-2")) -> FakeFleet:
    fleet = _fleet(hosts=hosts, replication=dict(REPLICATED))
    replica = vm_view(
        "g1", "host-2", state="replica", replication={**REPLICATED, "role": "replica"}
    )
    fleet.agents["host-2"].vms["g1"] = replica
    fleet.agents["host-1"].replication["g1"] = {
        "vm": "g1",
        "role": "primary",
        "state": "replicating",
        "health": "warning",
        "health_reasons": ["2 cycles missed"],
        "primary": "host-1",
        "replica": "host-2",
        "frequency_s": 30,
        "last_replication_time": 1000.0,
        "lag_s": 42.0,
        "success_count": 7,
        "miss_count": 2,
        "failure_count": 1,
        "pending_bytes": 0,
        "error": None,
    }
    fleet.agents["host-1"].points["g1"] = [
        {"id": 3, "time": 900.0, "size": 4096, "consistent": True},
        {"id": 4, "time": 960.0, "size": 8192, "consistent": True},
    ]
    return fleet


def _rows(html: str, testid: str) -> list[str]:
    return re.findall(rf'<tr [^>]*data-testid="{testid}"[^>]*>', html)


def test_overview_shows_hosts_and_alerts_and_skips_clusters_while_agents_have_none() -> None:
    fleet = _fleet()
    fleet.agents["host-2"].down = ConnectionFailedError("cannot reach host-2 at https://...")
    fleet.agents["host-1"].jobs.append(
        job(
            "j1",
            "move",
            "failed",
            created=1.0,
            updated=9000000000000.0,
            error="destination refused",
        )
    )

    async def body(console: Console) -> None:
        html = await console.page("/")
        hosts = _rows(html, "host-row")
        assert 'data-host="host-1" data-up="1"' in hosts[0]
        assert 'data-host="host-2" data-up="0"' in hosts[1]
        assert '<td data-testid="host-level">1</td>' in html
        assert '<td data-testid="host-accel">tcg</td>' in html
        assert "host host-2 does not answer: cannot reach host-2" in html
        assert "move of VM g1 on host-1 failed: destination refused" in html
        assert 'data-testid="clusters"' not in html  # GET /v1/cluster is 404 there

    run_console(fleet, body)


def test_overview_lists_clusters_and_nodes_once_an_agent_has_one() -> None:
    fleet = _fleet()
    for agent in fleet.agents.values():
        agent.cluster = {"name": "c1", "node": agent.name, "etcd": ["https://127.0.0.1:2379"]}
    fleet.cluster_views["c1"] = {
        "name": "c1",
        "etcd": [],
        "leader": "host-1",
        "functional_level": 3,
        "nodes": [
            {"name": "host-1", "state": "up", "vms": 1},
            {"name": "host-2", "state": "fenced", "vms": 0},
        ],
        "volumes": [{"name": "csv1", "path": "/csv1"}],
    }

    async def body(console: Console) -> None:
        html = await console.page("/")
        assert 'data-testid="clusters"' in html and "Leader host-1" in html
        assert "volumes: csv1 (/csv1)." in html
        fenced = '<th scope="row">host-2</th><td><span class="badge node-fenced">fenced</span>'
        assert fenced in html
        asked = {c for c in fleet.calls if "clusters" in c[2]}
        assert asked == {("host-1", "GET", "/v1/clusters/c1", None)}  # one member is enough

    run_console(fleet, body)


def test_a_host_networks_show_when_the_agent_reports_them() -> None:
    fleet = _fleet()
    fleet.agents["host-1"].facts = host_facts("host-1", networks=[{"name": "lab"}, "dmz"])

    async def body(console: Console) -> None:
        html = await console.page("/")
        assert '<td data-testid="host-networks">lab, dmz</td>' in html
        assert '<td data-testid="host-networks">-</td>' in html  # host-2 says nothing

    run_console(fleet, body)


def test_vms_lists_every_copy_and_links_the_replica_with_its_host() -> None:
    async def body(console: Console) -> None:
        await console.sampler.sample_once()
        html = await console.page("/vms")
        rows = _rows(html, "vm-row")
        assert [
            re.search(r'data-host="([^"]+)" data-state="([^"]+)"', r).groups() for r in rows
        ] == [("host-1", "running"), ("host-2", "replica")]
        assert 'href="/vms/g1?host=host-2"' in html and 'href="/vms/g1"' in html
        assert 'class="health-warning">to host-2: warning</td>' in html
        assert ">replica of host-1</td>" in html

    run_console(_replicated(), body)


def test_the_vm_page_shows_disks_replication_points_and_its_jobs() -> None:
    fleet = _replicated()
    fleet.agents["host-1"].jobs.append(
        job(
            "j9",
            "move",
            "copying-memory",
            created=5.0,
            updated=6.0,
            progress={"ram_bytes": 50, "ram_total": 200, "disk_total": 0, "mbps": 80},
        )
    )

    async def body(console: Console) -> None:
        html = await console.page("/vms/g1")
        assert '<span class="badge state-running" data-testid="vm-state">running</span>' in html
        assert "/data/g1/disk0.qcow2" in html
        assert '<dd data-testid="repl-cycles">7 / 2 / 1</dd>' in html
        assert '<dd data-testid="repl-lag">42 s</dd>' in html
        assert [p for p in re.findall(r'data-point="(\d+)"', html)] == ["4", "3"]  # newest first
        assert 'data-testid="action-repl-pause"' in html
        assert 'data-testid="action-repl-enable"' not in html
        assert "Changes made on host-1 after recovery point 4 are lost." in html
        assert 'data-job-id="j9"' in html and 'value="25"' in html
        assert "9.5M/s" in html  # 80 Mbit/s

    run_console(fleet, body)


def test_a_running_test_failover_is_named_and_no_host_left_means_no_choice() -> None:
    fleet = _replicated()
    fleet.agents["host-2"].vms["g1-test"] = vm_view("g1-test", "host-2")

    async def body(console: Console) -> None:
        html = await console.page("/vms/g1")
        hint = 'data-testid="test-failover-running">Test failover <a href="/vms/g1-test">g1-test'
        assert hint + "</a> is running on host-2" in html
        assert '<option value="">no host can take it</option>' in html  # host-2 holds the replica
        fragment = await console.page("/vms/g1/replication-actions")
        assert 'data-testid="test-failover-running"' in fragment

    run_console(fleet, body)


def test_a_vm_that_is_not_replicated_offers_enable_with_the_other_hosts() -> None:
    async def body(console: Console) -> None:
        html = await console.page("/vms/g1")
        assert 'data-testid="repl-none"' in html and 'data-testid="action-repl-enable"' in html
        select = html[html.index('id="repl-replica"') :]
        assert '<option value="host-2">' in select[: select.index("</select>")]
        assert '<option value="host-1">' not in select[: select.index("</select>")]

    run_console(_fleet(), body)


def test_an_unknown_vm_is_a_404_with_one_line() -> None:
    async def body(console: Console) -> None:
        html = await console.page("/vms/nope", status=404)
        assert re.search(r'role="alert" data-testid="action-error">no VM named', html)

    run_console(_fleet(), body)


def test_move_targets_say_why_a_host_cannot_take_the_vm() -> None:
    from ferry.web.operations import HostRow

    vm = vm_view("g1", "host-1", config_version=3, nics=[{"network": "lab"}])
    hosts = [
        HostRow("host-1", "u", host_facts("host-1", 3)),
        HostRow("host-2", "u", None, "cannot reach host-2"),
        HostRow("host-3", "u", host_facts("host-3", 2)),
        HostRow("host-4", "u", host_facts("host-4", 3, networks=["dmz"])),
        HostRow("host-5", "u", host_facts("host-5", 3)),
        HostRow("host-6", "u", host_facts("host-6", 4, networks=[{"name": "lab"}])),
        HostRow("host-7", "u", host_facts("host-7", 3)),
    ]
    found = {t.host: (t.ok, t.reason) for t in move_targets(vm, hosts, replica_hosts={"host-7"})}
    assert found == {
        "host-1": (False, "the VM runs here"),
        "host-2": (False, "host down: cannot reach host-2"),
        "host-3": (False, "functional level 2 is below the VM's configuration version 3"),
        "host-4": (False, "lacks network lab"),
        "host-5": (True, "functional level 3, tcg"),  # says nothing of networks: the agent checks
        "host-6": (True, "functional level 4, tcg"),
        "host-7": (False, "holds the VM's replica"),
    }


def test_the_destination_picker_disables_hosts_that_cannot_take_the_vm() -> None:
    fleet = _fleet(config_version=2)
    fleet.agents["host-2"].facts = host_facts("host-2", 1)

    async def body(console: Console) -> None:
        html = await console.page("/vms/g1")
        assert '<option value="host-2" disabled>host-2 (cannot)</option>' in html
        assert re.search(
            r'data-host="host-2" data-ok="0"><strong>host-2</strong>: cannot '
            r"\(functional level 1 is below the VM's configuration version 2\)",
            html.replace("&#39;", "'"),
        )

    run_console(fleet, body)


@pytest.mark.parametrize(
    ("action", "form", "call", "message"),
    [
        ("start", {}, ("host-1", "POST", "/v1/vms/g1/start", {}), "VM g1 is running on host-1"),
        ("stop", {}, ("host-1", "POST", "/v1/vms/g1/stop", {"timeout_s": 30}), "is off"),
        ("kill", {}, ("host-1", "POST", "/v1/vms/g1/kill", {}), "VM g1 is off on host-1"),
        (
            "move",
            {"to": "host-2"},
            (
                "host-1",
                "POST",
                "/v1/vms/g1/move",
                {
                    "to": "host-2",
                    "to_url": "https://127.0.0.1:10002",
                    "storage": "auto",
                    "max_bandwidth": None,
                    "downtime_limit_ms": None,
                },
            ),
            "moving VM g1 to host-2 (job",
        ),
        (
            "export",
            {"to": "/img/g1", "live": "on"},
            ("host-1", "POST", "/v1/vms/g1/export", {"to": "/img/g1", "live": True}),
            "exporting VM g1 to /img/g1",
        ),
        (
            "repl-enable",
            {"replica": "host-2", "frequency_s": "30"},
            (
                "host-1",
                "POST",
                "/v1/vms/g1/replication",
                {
                    "replica": "host-2",
                    "replica_url": "https://127.0.0.1:10002",
                    "frequency_s": 30,
                    "recovery_points": 4,
                    "initial": "network",
                    "media_dir": None,
                    "compression": True,
                    "initial_after": None,
                },
            ),
            "replication of VM g1 to host-2 enabled",
        ),
    ],
)
def test_each_action_sends_the_clis_request(
    action: str, form: dict[str, str], call: tuple[str, str, str, Any], message: str
) -> None:
    async def body(console: Console) -> None:
        status, html = await console.act("g1", action, **form)
        assert status == 200
        assert 'data-testid="action-ok"' in html and message in html, html
        assert console.fleet.actions() == [call]

    run_console(_fleet(), body)


@pytest.mark.parametrize(
    ("action", "call"),
    [
        ("repl-pause", ("host-1", "POST", "/v1/vms/g1/replication/pause", None)),
        ("repl-resume", ("host-1", "POST", "/v1/vms/g1/replication/resume", None)),
        ("repl-remove", ("host-1", "DELETE", "/v1/vms/g1/replication", None)),
        ("failover-test", ("host-2", "POST", "/v1/vms/g1/failover/test", {"point": None})),
        ("failover-stop-test", ("host-2", "POST", "/v1/vms/g1/failover/stop-test", {})),
        (
            "failover-start",
            ("host-2", "POST", "/v1/vms/g1/failover/start", {"point": None, "force": True}),
        ),
        ("failover-complete", ("host-2", "POST", "/v1/vms/g1/failover/complete", {})),
        ("failover-cancel", ("host-2", "POST", "/v1/vms/g1/failover/cancel", {})),
        ("failover-planned", ("host-1", "POST", "/v1/vms/g1/failover/planned", {})),
    ],
)
def test_replication_and_failover_go_to_the_host_the_cli_picks(
    action: str, call: tuple[str, str, str, Any]
) -> None:
    """Failover runs on the replica host (found by its replication role), planned on the primary."""

    async def body(console: Console) -> None:
        form = {"force": "on"} if action == "failover-start" else {}
        status, html = await console.act("g1", action, **form)
        assert status == 200 and 'data-testid="action-ok"' in html, html
        assert console.fleet.actions() == [call]

    run_console(_replicated(), body)


def _extended() -> FakeFleet:
    """g1 replicated host-1 -> host-2, and extended from host-2 to host-3."""
    fleet = _replicated(("host-1", "host-2", "host-3"))
    extended = {**REPLICATED, "role": "replica", "primary": "host-2", "replica": "host-3",
                "origin": "host-1"}  # fmt: skip
    fleet.agents["host-3"].vms["g1"] = vm_view("g1", "host-3", state="replica",
                                               replication=extended)  # fmt: skip
    return fleet


DESTRUCTIVE = [
    "action-stop", "action-kill", "action-move", "action-repl-remove",
    "action-failover-planned", "action-failover-start", "action-failover-complete",
    "action-failover-cancel", "action-failover-stop-test",
]  # fmt: skip


def _form_of(html: str, testid: str) -> str:
    """The opening tag of the form that holds the button ``testid``."""
    button = html.index(f'data-testid="{testid}"')
    return html[html.rindex("<form", 0, button) : html.index(">", html.rindex("<form", 0, button))]


SAFE = {"start", "export", "repl-enable", "repl-pause", "repl-resume", "failover-test"}


def test_every_action_is_known_as_destructive_or_not() -> None:
    """A new action (a delete, say) must join one list or the other."""
    assert set(ACTIONS) == SAFE | {t.removeprefix("action-") for t in DESTRUCTIVE}


@pytest.mark.parametrize("testid", DESTRUCTIVE)
def test_every_destructive_action_asks_first(testid: str) -> None:
    fleet = _replicated()
    fleet.agents["host-2"].vms["g1-test"] = vm_view("g1-test", "host-2")

    async def body(console: Console) -> None:
        paths = ["/vms/g1"]
        if "repl" in testid or "failover" in testid:  # reloaded alone after an action
            paths.append("/vms/g1/replication-actions")
        for path in paths:
            html = await console.page(path)
            form = _form_of(html, testid)
            assert re.search(r'hx-confirm="[^"]{10,}"', form), (path, form)

    run_console(fleet, body)


def test_failover_offers_the_replica_hosts_and_the_recovery_points() -> None:
    async def body(console: Console) -> None:
        html = await console.page("/vms/g1")
        hosts = html[html.index('id="failover-replica-host"') :]
        hosts = hosts[: hosts.index("</select>")]
        assert re.findall(r'<option value="([^"]*)"', hosts) == ["", "host-2", "host-3"]
        assert "host-3 (extended replica)" in hosts and "selected" not in hosts
        for select in ("failover-test-point", "failover-point"):
            choice = html[html.index(f'id="{select}"') :]
            assert re.findall(r'<option value="([^"]*)"', choice[: choice.index("</select>")]) == [
                "", "4", "3"
            ]  # fmt: skip
        for testid in ("action-failover-test", "action-failover-stop-test",
                       "action-failover-start", "action-failover-complete",
                       "action-failover-cancel"):  # fmt: skip
            assert 'hx-include="#failover-replica-host"' in _form_of(html, testid)
        assert "hx-include" not in _form_of(html, "action-failover-planned")  # the primary's
        replica_page = await console.page("/vms/g1/replication-actions?host=host-3")
        assert '<option value="host-3" selected>' in replica_page

    run_console(_extended(), body)


@pytest.mark.parametrize(
    ("action", "form", "call"),
    [
        ("failover-test", {"point": "3", "replica_host": "host-3"},
         ("host-3", "POST", "/v1/vms/g1/failover/test", {"point": 3})),
        ("failover-test", {"point": "4"},
         ("host-2", "POST", "/v1/vms/g1/failover/test", {"point": 4})),
        ("failover-start", {"point": "3", "replica_host": "host-3", "force": "on"},
         ("host-3", "POST", "/v1/vms/g1/failover/start", {"point": 3, "force": True})),
        ("failover-stop-test", {"replica_host": "host-3"},
         ("host-3", "POST", "/v1/vms/g1/failover/stop-test", {})),
        ("failover-complete", {"replica_host": "host-3"},
         ("host-3", "POST", "/v1/vms/g1/failover/complete", {})),
        ("failover-cancel", {"replica_host": "host-3"},
         ("host-3", "POST", "/v1/vms/g1/failover/cancel", {})),
        ("failover-planned", {"host": "host-1"},
         ("host-1", "POST", "/v1/vms/g1/failover/planned", {})),
    ],
)  # fmt: skip
def test_failover_takes_the_clis_host_and_point(
    action: str, form: dict[str, str], call: tuple[str, str, str, Any]
) -> None:
    """``--host`` (the chosen replica; for planned the primary) and ``--point`` as the CLI
    sends them: the pinned host is asked directly, without looking the VM up."""

    async def body(console: Console) -> None:
        console.fleet.calls.clear()  # signing in read the overview
        status, html = await console.act("g1", action, **form)
        assert status == 200 and 'data-testid="action-ok"' in html, html
        assert console.fleet.actions() == [call]
        lookups = [c for c in console.fleet.calls if c[2] == "/v1/vms"]
        pinned = "host" in form or "replica_host" in form
        assert bool(lookups) != pinned, lookups  # a given host is asked without a search

    run_console(_extended(), body)


def test_a_recovery_point_that_is_not_a_number_is_refused_before_any_call() -> None:
    async def body(console: Console) -> None:
        _, html = await console.act("g1", "failover-test", point="latest-ish")
        assert 'data-testid="action-error">the recovery point must be a point id' in html
        assert console.fleet.actions() == []

    run_console(_extended(), body)


def test_a_refused_action_is_one_alert_line_and_the_page_is_told_nothing_changed() -> None:
    fleet = _fleet()
    fleet.agents["host-1"].refuse["POST /v1/vms/g1/start"] = StateError(
        "cannot start VM 'g1': it is running (needs: crashed, off)"
    )

    async def body(console: Console) -> None:
        reply = await console.client.post(
            "/vms/g1/actions/start",
            data={"csrf": console.csrf},
            headers={"Origin": console.origin, "HX-Request": "true"},
        )
        html = (await reply.text()).strip()
        assert reply.status == 200 and "HX-Trigger" not in reply.headers
        assert html == (
            '<p class="error" role="alert" data-testid="action-error">cannot start '
            "VM &#39;g1&#39;: it is running (needs: crashed, off)</p>"
        )
        ok = await console.client.post(
            "/vms/g1/actions/kill",
            data={"csrf": console.csrf},
            headers={"Origin": console.origin, "HX-Request": "true"},
        )
        assert ok.headers["HX-Trigger"] == "ferry-changed"

    run_console(fleet, body)


def test_without_htmx_an_action_answers_a_page_with_the_same_line() -> None:
    fleet = _fleet()
    fleet.agents["host-1"].refuse["POST /v1/vms/g1/start"] = StateError("VM 'g1' is running")

    async def body(console: Console) -> None:
        status, html = await console.act("g1", "start", htmx=False)
        assert status == 409
        assert 'role="alert" data-testid="action-error">VM &#39;g1&#39; is running</p>' in html
        assert '<a href="/vms/g1">Back</a>' in html

    run_console(fleet, body)


def test_a_form_missing_its_field_is_refused_before_any_agent_call() -> None:
    async def body(console: Console) -> None:
        _, html = await console.act("g1", "move")
        assert 'data-testid="action-error">give to</p>' in html
        assert console.fleet.actions() == []
        assert (await console.act("g1", "reboot"))[0] == 404

    run_console(_fleet(), body)


async def _events(console: Console, path: str, count: int) -> list[tuple[str, str]]:
    """The first ``count`` events of an SSE stream."""
    found: list[tuple[str, str]] = []
    async with console.client.get(path) as reply:
        assert reply.headers["Content-Type"] == "text/event-stream"
        event, data = "", []
        while len(found) < count:
            line = (await asyncio.wait_for(reply.content.readline(), 5)).decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif line == "" and event:
                found.append((event, "\n".join(data)))
                event, data = "", []
    return found


def test_job_rows_stream_with_their_progress() -> None:
    fleet = _fleet()
    fleet.agents["host-1"].jobs.append(
        job(
            "j1",
            "export",
            "running",
            phase="copying",
            created=1.0,
            updated=2.0,
            progress={"bytes": 3145728, "total": 12582912},
        )
    )

    async def body(console: Console) -> None:
        [(event, html)] = await _events(console, "/jobs/events?vm=g1", 1)
        assert event == "jobs"
        assert 'data-job-id="j1"' in html and 'data-state="running"' in html
        assert 'value="25"' in html and "3M / 12M" in html and ">copying" in html

    run_console(fleet, body)


def test_the_console_streams_the_serial_log_as_json_text() -> None:
    fleet = _fleet()
    fleet.agents["host-1"].console_log["g1"] = "ferry-guest up last-seq=0\r\nseq 1\r\n"

    async def body(console: Console) -> None:
        [(event, data)] = await _events(console, "/vms/g1/console/events", 1)
        assert event == "console" and json.loads(data) == "ferry-guest up last-seq=0\r\nseq 1\r\n"
        assert ("host-1", "GET", "/v1/vms/g1/console", None) in fleet.calls

    run_console(fleet, body)


def test_the_sampler_records_lag_for_the_plot_and_health_for_the_alerts() -> None:
    async def body(console: Console) -> None:
        before = len(console.sampler.series("g1"))  # it sampled once when it started
        await console.sampler.sample_once()
        await console.sampler.sample_once()
        lag = await (await console.client.get("/vms/g1/lag.json")).json()
        assert lag["lag"] == [42.0] * (before + 2) and len(lag["t"]) == before + 2
        # The status came from the primary, not from the replica copy.
        asked = [c[0] for c in console.fleet.calls if c[2] == "/v1/vms/g1/replication"]
        assert set(asked) == {"host-1"}
        html = await console.page("/")
        assert "replication of VM g1 is warning: 2 cycles missed" in html
        page = await console.page("/vms/g1")
        assert f'data-samples="{before + 2}"' in page

    run_console(_replicated(), body)


def test_alerts_leave_out_old_failures_and_healthy_replication() -> None:
    old = {
        "id": "j",
        "kind": "move",
        "vm": "g1",
        "host": "h",
        "state": "failed",
        "updated": 0.0,
        "error": "x",
    }
    assert alerts([], {"g1": {"health": "normal"}}, [old], now=10 * 24 * 3600.0) == []


def test_a_finished_job_fills_its_bar_and_shows_no_rate() -> None:
    done = job_row(
        {
            "id": "j",
            "kind": "move",
            "vm": "g1",
            "host": "h",
            "state": "done",
            "created": 1.0,
            "progress": {"mbps": 100},
        }
    )
    assert done["percent"] == 100 and done["rate"] is None and done["total"] == 0


def test_an_action_that_starts_a_job_follows_it_to_its_end_in_one_line() -> None:
    fleet = _fleet()

    async def body(console: Console) -> None:
        _, html = await console.act("g1", "move", to="host-2")
        follow = re.search(r'sse-connect="(/jobs/follow\?host=host-1&amp;id=([^"]+))"', html)
        assert follow and 'sse-close="end"' in html
        agent = fleet.agents["host-1"]
        agent.jobs[-1].update(state="failed", error="destination refused: no space")
        found = await _events(console, follow[1].replace("&amp;", "&"), 2)
        assert found[1] == ("end", "")
        assert found[0][0] == "job" and 'role="alert"' in found[0][1]
        assert "move of VM g1 failed: destination refused: no space" in found[0][1]

    run_console(fleet, body)


def test_the_jobs_page_shows_results_and_errors() -> None:
    fleet = _fleet()
    fleet.agents["host-1"].jobs += [
        job("j1", "move", "done", target="host-2",
            result={"host": "host-2", "total_s": 12.34, "downtime_ms": 40}),
        job("j2", "failover-planned", "failed", created=2.0,
            error="host 'host-2' is not a replica server"),
    ]  # fmt: skip

    async def body(console: Console) -> None:
        html = await console.page("/jobs")
        assert '<td data-testid="job-result">on host-2, 12.3 s, 40 ms downtime</td>' in html
        assert (
            'data-testid="job-error" class="error">host &#39;host-2&#39; is not a replica' in html
        )
        assert html.index('data-job-id="j2"') < html.index('data-job-id="j1"')  # newest first

    run_console(fleet, body)


def test_polled_parts_say_in_a_plain_line_when_the_vm_is_gone() -> None:
    async def body(console: Console) -> None:
        for part in ("summary", "replication", "replication-actions"):
            html = await console.page(f"/vms/nope/{part}")
            assert html.startswith('<p class="error" data-testid="fragment-error">no VM named')
            assert "role=" not in html

    run_console(_fleet(), body)
