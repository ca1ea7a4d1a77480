"""``GET /metrics`` on real agents (issue 14 item 1): over admin TLS and the loopback listener.

A two-host lab: host-1's agent restarts with ``metrics_listen`` on a free
loopback port. VM ``metrics-rep`` replicates from host-1 to host-2 every 30 s
(one more cycle by ``replication sync``), VM ``metrics-mv`` moves from host-1
to host-2. Then both agents are scraped: the text passes ``promtool check
metrics`` with nothing to say, and the figures are what happened (cycles
counted, lag within bounds, the move counted ok with its downtime, states
right). A host certificate is refused on ``/metrics``; a non-loopback
``metrics_listen`` stops the agent at start with one line.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
import subprocess
import tomllib
from pathlib import Path

import aiohttp
import pytest
import tomli_w
from prometheus_client.parser import text_string_to_metric_families

from ferry.adapters.pki import client_ssl_context
from ferry.client.settings import load_settings
from ferry.host.config import load_host_config
from tests.conftest import LabEnv, _run_in_process
from tests.unit.test_metrics import dashboard_metric_names

pytestmark = pytest.mark.integration

REPLICATED = "metrics-rep"
MOVED = "metrics-mv"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _admin_url(lab_env: LabEnv, index: int) -> str:
    address, port = load_host_config(lab_env.lab.host(index).config_path).address
    return f"https://{address}:{port}/metrics"


def _get(url: str, tls: ssl.SSLContext | None = None,
         server_name: str | None = None) -> tuple[int, str, str]:  # fmt: skip
    """(status, content type, body) of a GET; over TLS the agent's certificate names its host."""

    async def get() -> tuple[int, str, str]:
        async with aiohttp.ClientSession() as session, session.get(
            url, ssl=tls if tls is not None else False, server_hostname=server_name,
            timeout=aiohttp.ClientTimeout(total=30),
        ) as reply:  # fmt: skip
            return reply.status, reply.headers.get("Content-Type", ""), await reply.text()

    return asyncio.run(get())


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def value(text: str, name: str, **labels: str) -> float | None:
    return _samples(text).get((name, frozenset(labels.items())))


def promtool(text: str) -> None:
    done = subprocess.run(["/usr/bin/promtool", "check", "metrics"], input=text,
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    said = (done.stdout + done.stderr).strip()
    assert done.returncode == 0 and said == "", f"promtool check metrics: {said}"


@pytest.fixture(scope="module")
def world(lab_env: LabEnv, tmp_path_factory: pytest.TempPathFactory) -> int:
    """The lab after one replication and one move; yields host-1's metrics_listen port."""
    cli = lab_env.cli
    port = _free_port()
    lab_env.restart_agent(1, metrics_listen=f"127.0.0.1:{port}")
    storage = tmp_path_factory.mktemp("replicas")
    cli("replica-server", "enable", "--host", "host-2", "--storage", str(storage),
        "--allow", "host-1")  # fmt: skip
    for name in (REPLICATED, MOVED):
        cli("vm", "create", name, "--host", "host-1", "--guest", "test", "--memory", "96M",
            "--disk", "32M", "--start")  # fmt: skip
    # The guests need not have booted: QEMU tracks and copies the disks from the start.
    cli("replication", "enable", REPLICATED, "--replica", "host-2", "--frequency", "30s")
    outcome = cli.json("replication", "sync", REPLICATED)
    assert outcome["result"] == "ok", outcome
    cli("vm", "move", MOVED, "--to", "host-2")
    # Nothing to undo: the lab (its agents and QEMUs) is this module's and goes with it.
    return port


def test_metrics_over_admin_tls_and_loopback(lab_env: LabEnv, world: int) -> None:
    admin = client_ssl_context(load_settings(lab_env.home).tls_dir())
    status, kind, one = _get(_admin_url(lab_env, 1), admin, "host-1")
    assert status == 200, one
    assert kind.startswith("text/plain; version=0.0.4"), kind
    status, _, two = _get(_admin_url(lab_env, 2), admin, "host-2")
    assert status == 200, two
    promtool(one)
    promtool(two)

    # host-1, the primary: the initial copy and the sync were cycles that succeeded.
    cycles = value(one, "ferry_replication_cycles_total", vm=REPLICATED, result="ok")
    assert cycles is not None and cycles >= 2, cycles
    assert value(one, "ferry_replication_cycle_duration_seconds_count", vm=REPLICATED) == cycles
    sent = value(one, "ferry_replication_cycle_bytes_sum", vm=REPLICATED)
    assert sent is not None and sent > 0
    lag = value(one, "ferry_replication_lag_seconds", vm=REPLICATED, role="primary")
    assert lag is not None and 0 <= lag < 120, lag
    assert value(one, "ferry_replication_rpo_objective_seconds", vm=REPLICATED,
                 role="primary") == 30  # fmt: skip
    assert value(one, "ferry_replication_health", vm=REPLICATED, health="normal") == 1
    assert value(one, "ferry_vm_state", vm=REPLICATED, state="running") == 1
    # The move: counted once, ok, with its downtime and bytes; its VM is gone from here.
    assert value(one, "ferry_migrations_total", result="ok") == 1
    assert value(one, "ferry_migration_downtime_seconds_count") == 1
    downtime = value(one, "ferry_migration_downtime_seconds_sum")
    assert downtime is not None and 0 < downtime < 30, downtime
    moved = value(one, "ferry_migration_bytes_sum")
    assert moved is not None and moved > 1024**2, moved
    done = value(one, "ferry_jobs", kind="move", state="done")
    assert done is not None and done >= 1
    assert value(one, "ferry_vm_state", vm=MOVED, state="running") is None
    assert value(one, "ferry_agent_info", host="host-1", version=__import__("ferry").__version__)
    rss = value(one, "process_resident_memory_bytes")
    assert rss is not None and rss > 10 * 1024**2

    # Every metric the Grafana dashboard queries is a family this real agent declares.
    declared = set(re.findall(r"^# TYPE (\S+) ", one, re.MULTILINE))
    for name in dashboard_metric_names():
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in declared or family in declared, f"the dashboard uses {name}"

    # host-2, the replica host and the move's destination.
    points = value(two, "ferry_replication_recovery_points", vm=REPLICATED)
    assert points is not None and points >= 1, points
    assert value(two, "ferry_vm_state", vm=REPLICATED, state="replica") == 1
    assert value(two, "ferry_vm_state", vm=MOVED, state="running") == 1
    assert value(two, "ferry_migrations_total", result="ok") is None  # counted at the source

    # The loopback listener serves the same registry, in plain HTTP, and nothing else.
    status, kind, plain = _get(f"http://127.0.0.1:{world}/metrics")
    assert status == 200 and kind.startswith("text/plain; version=0.0.4"), (status, kind)
    promtool(plain)
    assert value(plain, "ferry_migrations_total", result="ok") == 1
    assert _get(f"http://127.0.0.1:{world}/v1/vms")[0] == 404


def test_a_host_certificate_is_refused(lab_env: LabEnv, world: int) -> None:
    host = client_ssl_context(lab_env.lab.host(2).dir / "tls")
    status, _, body = _get(_admin_url(lab_env, 1), host, "host-1")
    assert status == 403, body
    error = json.loads(body)["error"]
    assert error["code"] and "may only call peer endpoints" in error["message"]
    assert "\n" not in body.strip()


def test_a_non_loopback_metrics_listen_stops_the_agent(lab_env: LabEnv, tmp_path: Path) -> None:
    settings = tomllib.loads(lab_env.lab.host(1).config_path.read_text())
    settings.update(metrics_listen="0.0.0.0:9464", data_dir=str(tmp_path / "data"))
    config = tmp_path / "host.toml"
    config.write_text(tomli_w.dumps(settings))
    # In this process: the config is refused before the agent does anything (no
    # lock, no port, no thread), so nothing can outlive the call.
    done = _run_in_process(lab_env.home, ("agent", "--config", str(config)))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "metrics_listen: 0.0.0.0:9464 is not a loopback address" in lines[0]
    assert "no authentication" in lines[0]
    assert not (tmp_path / "data").exists(), "the agent acted before refusing its config"
