"""Shared fixtures: a real lab of agents on loopback, the CLI, the test guest.

Every process a fixture starts is ended by pid in its finalizer, and the lab
fixture checks that no QEMU or agent of its own is left behind.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from ferry.adapters import netdev
from ferry.guest.build import ensure_guest
from ferry.lab import Lab

# The test guest's console (serial lines end in CRLF; the CLI's text mode may
# turn them into LF). The log arrives a byte at a time: parse whole lines only.
UP = re.compile(r"ferry-guest up last-seq=(\d+)\r?\n")
SEQ = re.compile(r"^seq (\d+)", re.MULTILINE)


def complete(text: str) -> str:
    """Only whole lines of a console log."""
    return text[: text.rfind("\n") + 1]


def same_image(a: Path, b: Path) -> bool:
    """``qemu-img compare``: both images read the same (backing chains followed)."""
    return subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)],
                          capture_output=True).returncode == 0  # fmt: skip


def seqs(text: str) -> list[int]:
    """The record numbers the guest reported, in order."""
    return [int(n) for n in SEQ.findall(complete(text))]


def wait(what: str, probe: Callable[[], Any], timeout: float = 90) -> Any:
    """Poll ``probe`` until it returns something true; that value (a failing CLI call,
    an AssertionError, counts as not yet: the lab may still be settling)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except AssertionError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.5)
    raise AssertionError(f"{what} did not happen within {timeout:.0f}s (last: {last!r})")


@pytest.fixture(scope="session")
def guest_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The test guest, built once per session (or taken from $FERRY_GUEST_CACHE)."""
    preset = os.environ.get("FERRY_GUEST_CACHE")
    cache = Path(preset) if preset else tmp_path_factory.mktemp("guest-cache")
    ensure_guest(cache)
    old = os.environ.get("FERRY_GUEST_CACHE")
    os.environ["FERRY_GUEST_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("FERRY_GUEST_CACHE", None)


# Commands that start processes meant to outlive the command (lab agents) or
# that serve until stopped: always a real ``python -m ferry``.
_OWN_PROCESS = frozenset({"lab", "agent", "web"})
_in_process_lock = threading.Lock()


def _run_in_process(home: Path, args: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    """``ferry ARGS`` through ``ferry.cli.main.main`` in this process.

    The same code as ``python -m ferry`` runs, minus the interpreter start-up
    and the imports (about 0.9 s of CPU a command, most of an integration
    test's CLI time, and CPU taken from the TCG guests of the other worker).
    It sees what a child would: $FERRY_HOME set and $FERRY_DEBUG unset, an
    empty stdin, piped (non-terminal) stdout and stderr; an uncaught exception
    becomes a traceback on stderr and exit status 1, as Python would print it.
    """
    saved_env = {k: os.environ.get(k) for k in ("FERRY_HOME", "FERRY_DEBUG")}
    out, err = io.StringIO(), io.StringIO()
    saved_streams = sys.stdin, sys.stdout, sys.stderr
    os.environ["FERRY_HOME"] = str(home)
    os.environ.pop("FERRY_DEBUG", None)
    sys.stdin, sys.stdout, sys.stderr = io.StringIO(), out, err
    try:
        from ferry.cli import main as cli_main  # first import inside: consoles see pipes

        cli_main._debug["on"] = False  # as a fresh process without $FERRY_DEBUG has it
        try:
            cli_main.main(list(args))
            code = 0
        except SystemExit as exc:  # main() always ends so, with an int (or None: 0)
            code = (exc.code or 0) if isinstance(exc.code, int | None) else 1
        except Exception:  # what the interpreter would print before exiting 1
            traceback.print_exc(file=err)
            code = 1
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved_streams
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if code == 130 and err.getvalue().startswith("ferry: interrupted"):
        raise KeyboardInterrupt  # Ctrl-C was meant for the test run
    return subprocess.CompletedProcess(["ferry", *args], code, out.getvalue(), err.getvalue())


def _can_run_in_process() -> bool:
    """Only on the main thread, outside an event loop, with $FERRY_TEST_CLI unset."""
    if os.environ.get("FERRY_TEST_CLI") == "subprocess":
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return True
    return False


@dataclass
class Cli:
    """Runs the real ``ferry`` command with this lab's $FERRY_HOME.

    Most commands run in this process (see ``_run_in_process``); lab and
    agent commands, and every command with ``FERRY_TEST_CLI=subprocess``,
    run as ``python -m ferry`` (tests that need a real process, to signal it
    or to run it beside another, start one themselves).
    """

    home: Path

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        if (args and args[0] not in _OWN_PROCESS and _can_run_in_process()
                and _in_process_lock.acquire(blocking=False)):  # fmt: skip
            try:
                result = _run_in_process(self.home, args)
            finally:
                _in_process_lock.release()
        else:
            env = dict(os.environ, FERRY_HOME=str(self.home))
            env.pop("FERRY_DEBUG", None)
            result = subprocess.run(
                [sys.executable, "-m", "ferry", *args],
                capture_output=True,
                text=True,
                env=env,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        if check and result.returncode != 0:
            raise AssertionError(
                f"ferry {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--json").stdout)

    def fails(self, *args: str) -> str:
        """Run a command that must fail; return its single stderr line."""
        result = self(*args, check=False)
        assert result.returncode != 0, f"ferry {' '.join(args)} unexpectedly succeeded"
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, f"expected one error line, got: {result.stderr!r}"
        assert "Traceback" not in result.stderr
        return lines[0]


@dataclass
class LabEnv:
    lab: Lab
    cli: Cli
    home: Path

    def vm(self, name: str, host: str | None = None) -> dict[str, Any]:
        args = ["vm", "show", name] + (["--host", host] if host else [])
        result: dict[str, Any] = self.cli.json(*args)
        return result

    def kill_agent(self, index: int) -> None:
        """SIGKILL host-``index``'s agent (its QEMUs live on) and wait until it is gone."""
        host = self.lab.host(index)
        pid = host.pid()
        assert pid is not None, f"the agent of {host.name} is not running"
        os.kill(pid, signal.SIGKILL)
        while host.pid() is not None:
            time.sleep(0.1)

    def restart_agent(self, index: int, **config: object) -> None:
        """Stop host-``index``'s agent (SIGTERM) if it runs, change its host.toml, start it."""
        import tomllib

        host = self.lab.host(index)
        pid = host.pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
        while host.pid() is not None:
            time.sleep(0.1)
        settings = tomllib.loads(host.config_path.read_text())
        settings.update(config)
        host.config_path.write_text(tomli_w.dumps(settings))
        # What 'ferry lab up' runs, minus a CLI start-up (tests of that command
        # call it themselves); this Lab reaps the agent it starts at lab down.
        self.lab.up(len(self.lab.hosts()))

    def console(self, name: str, host: str | None = None) -> str:
        """The VM's serial log through the agent API, read in this process.

        Polling through the CLI cost a Python start-up per look (about 0.7 s
        of CPU), which slowed the TCG guests of the other test worker; the
        CLI's own ``vm console`` is tested in ``test_vm_lifecycle``.
        """
        from ferry.client.fleet import Fleet
        from ferry.client.settings import load_settings

        async def read() -> str:
            async with Fleet(load_settings(self.home)) as fleet:
                where, _ = await fleet.locate(name, host)
                chunk = await fleet.client(where).get(f"/v1/vms/{name}/console", offset="0")
                return str(chunk["text"])

        # As the CLI's output reads in text mode: the serial line ends "\r\n".
        return asyncio.run(read()).replace("\r\n", "\n").replace("\r", "\n")

    def wait_console(self, name: str, pattern: Callable[[str], bool], timeout: float = 60,
                     host: str | None = None) -> str:  # fmt: skip
        """Poll the VM's serial log until ``pattern`` holds; return the log."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.console(name, host)
            if pattern(text):
                return text
            time.sleep(0.5)
        raise AssertionError(f"console of {name} never matched; it holds:\n{text[-2000:]}")


def qemu_pids_for(uuid: str) -> list[int]:
    """Every live process whose command line carries ``uuid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if uuid.encode() in argv:
            pids.append(int(entry.name))
    return pids


def _lab_processes(root: Path) -> list[int]:
    """Agents and QEMUs that belong to the lab at ``root``."""
    marker = str(root).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


@contextmanager
def lab_session(root: Path) -> Iterator[LabEnv]:
    """A lab under ``root`` (not up yet) with ``$FERRY_HOME`` at ``root/home`` for
    its life; on the way out ``lab down``, ``$FERRY_HOME`` as it was, and a check
    that no agent, QEMU, fence guard, etcd or network namespace of the lab is left."""
    home = root / "home"
    old_home = os.environ.get("FERRY_HOME")
    os.environ["FERRY_HOME"] = str(home)
    lab = Lab(root / "lab")
    try:
        yield LabEnv(lab=lab, cli=Cli(home), home=home)
    finally:
        lab.down()
        if old_home is None:
            os.environ.pop("FERRY_HOME", None)
        else:
            os.environ["FERRY_HOME"] = old_home
        left = _lab_processes(lab.root)
        assert not left, f"lab processes left running: {left}"
        assert not netdev.netns_exists(lab.netns), f"lab namespace {lab.netns} left behind"


@pytest.fixture(scope="module")
def lab_env(tmp_path_factory: pytest.TempPathFactory, guest_cache: Path) -> Iterator[LabEnv]:
    """Two lab hosts with running agents; torn down (and checked) afterwards."""
    with lab_session(tmp_path_factory.mktemp("lab")) as env:
        env.lab.up(2)
        yield env


# Rough seconds each long module takes on one worker of an idle 2-core machine.
# Under xdist (scripts/test.sh: --dist loadfile --no-loadscope-reorder) workers
# take whole modules in collection order, so the longest go first and the many
# short unit modules fill in at the end: the two workers finish together. A
# module not listed counts as UNLISTED_S (unit tests: UNIT_S).
MODULE_SECONDS = {
    # Ten TCG boots, eight through OVMF and its shell: 6 tests in 267 s at load 5 (691 s at 14).
    "integration/test_firmware.py": 270,
    "integration/test_cluster_ha.py": 330,
    # Two clusters of two nodes, five TCG boots, four node crashes: 470 s at load 25-33
    # before the two source losses after the hand-over were added (2 in 54 s idle).
    "integration/test_cluster_crossing.py": 530,
    # Two clusters of two nodes sharing a volume, three boots of one 128M guest: 4 tests in 18 s.
    "integration/test_cluster_copy_roles.py": 150,  # 8 in 106-136 s at load ~4
    # A cluster of two nodes and a standalone primary, one 128M guest, one node kill: 2 in 24 s.
    "integration/test_replica_broker.py": 60,
    "integration/test_replication.py": 300,
    # One TCG guest replicated every 5 s for 75 s: 240 s at load 16-22 (its boot 100 s of it).
    "integration/test_continuous_replication.py": 130,
    "integration/test_failover.py": 300,
    "integration/test_network_moves.py": 320,
    "integration/test_multidisk.py": 280,
    "integration/test_cluster_replication.py": 240,
    "e2e/test_web.py": 210,
    "integration/test_export_import.py": 200,
    "integration/test_cluster_vms.py": 180,
    "integration/test_lab_cluster.py": 130,
    "integration/test_cluster_membership.py": 110,
    "integration/test_networks.py": 230,
    "integration/test_vnc.py": 90,
    "integration/test_adopt.py": 130,
    "integration/test_guest_agent.py": 250,
    "integration/test_migration_refusals.py": 170,
    "integration/test_vm_lifecycle.py": 160,
    "integration/test_plan_apply.py": 260,
    # +40 s: a copy move with a 4 s disk phase (98 s at load 25, beside an 86 s move test)
    "integration/test_migration.py": 190,
    "integration/test_migration_cancel.py": 100,
    # 2 hosts, 2 small guests moved (one with --postcopy at a 4 MiB/s cap): 101 s at load 5.
    "integration/test_switchover.py": 110,
    "integration/test_guest_boot.py": 120,
    # 3 hosts, 2 small guests, a move, ~700 calls (8 callers): 179 s at load 13, 282 s at 30.
    "integration/test_authorisation_matrix.py": 180,
    # 2 hosts, 1 small guest replicating; renew, revoke, one agent restart: 85 s at load ~15.
    "integration/test_pki_renewal.py": 85,
    "integration/test_migration_versions.py": 70,
    "integration/test_cpu_models.py": 110,
    "integration/test_block_hashes.py": 60,
    "integration/test_bad_input.py": 50,
    "integration/test_plan_create.py": 100,
    # Two small guests, one replication and one move; 55 s at load 11.
    "integration/test_metrics.py": 60,
    # One 2-host lab: doctor (healthy, missing bridge, short-lived cert), a JSON-logged move.
    "integration/test_operations.py": 80,
    "integration/test_agent_service.py": 25,
    "integration/test_qmp_events.py": 3,  # one QEMU with no machine: 1.4 s
    # systemd as PID 1 of a namespace, one idle QEMU, two restarts: 29 s at load 3.
    "integration/test_systemd_unit.py": 30,
    # Fault suites, short form (tests/faults), measured at load 20 to 30.
    "faults/test_kill_ops.py": 300,
    "faults/test_kill_move.py": 215,  # +15 s: the destination QEMU killed as the disk copy connects
    "faults/test_kill_failover.py": 60,  # 40 s of runs at load 5-7; 335 s when a run stalls
    "faults/test_disk_full.py": 190,
    "faults/test_stream_faults.py": 180,
}
UNLISTED_S = 100
UNIT_S = 5


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker: modules longest first (a stable sort keeps each module's order)."""
    if not hasattr(config, "workerinput"):
        return

    def seconds(item: pytest.Item) -> float:
        module = item.nodeid.split("::")[0].removeprefix("tests/")
        return MODULE_SECONDS.get(module, UNIT_S if module.startswith("unit/") else UNLISTED_S)

    items.sort(key=seconds, reverse=True)
