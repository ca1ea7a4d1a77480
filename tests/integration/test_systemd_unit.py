"""The packaged unit under a real systemd: readiness, restart, watchdog, stop, with a QEMU running.

PID 1 of this machine is not systemd, so the test boots one: Debian's
``/lib/systemd/systemd --system`` as PID 1 of a new PID and mount namespace
(``unshare``), in container mode. Its unit directory is a tmpfs holding only
the packaged ``ferry-agent.service``, a drop-in (ExecStart to this checkout's
Python, no default dependencies, a 4 s watchdog so the test is quick) and a
target that wants it; the host's boot units (sysinit, tmpfiles, journald,
udev...) are masked, and ``/run``, ``/var/lib``, ``/var/log``, ``/etc/ferry``
and ``/etc/systemd/system`` are tmpfs mounts of that namespace, so nothing of
the host is touched. Every process it starts (the agent, its QEMU) lives in
the namespace; SIGKILL of the namespace's PID 1 at the end ends them all.

The agent runs with every hardening directive of the unit, and starts a real
QEMU (TCG, an empty disk: SeaBIOS idles; the built-in test guest cannot be
built there, ``ProtectKernelModules`` hides ``/lib/modules``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w

from ferry.adapters import loopback
from ferry.adapters.pki.issue import create_ca, issue_admin_cert, issue_host_cert
from ferry.client.settings import ClientSettings, HostEntry, save_settings
from ferry.packaging import agent_unit
from tests.conftest import qemu_pids_for

pytestmark = pytest.mark.integration

SYSTEMD = Path("/lib/systemd/systemd")
MASKED = ["sysinit.target", "basic.target", "sockets.target", "timers.target", "paths.target",
          "slices.target", "local-fs.target", "swap.target", "network.target",
          "network-online.target", "systemd-journald.service", "systemd-journald.socket",
          "systemd-tmpfiles-setup.service", "systemd-tmpfiles-setup-dev.service",
          "systemd-tmpfiles-clean.timer", "systemd-udevd.service", "getty.target",
          "systemd-logind.service"]  # fmt: skip
INNER = """\
#!/bin/bash
# PID 1's parent, inside the new namespaces: private mounts, then systemd.
set -euo pipefail
src="$1"
mount --make-rprivate /
for d in /run /var/lib /var/log /etc/ferry /etc/systemd/system; do
  mkdir -p "$d"; mount -t tmpfs tmpfs "$d"
done
cp -r "$src/units/." /etc/systemd/system/
cp -r "$src/etc-ferry/." /etc/ferry/
for u in {masked}; do ln -sf /dev/null "/etc/systemd/system/$u"; done
exec env container=ferry-test {systemd} --system --unit=ferry-test.target \\
  --log-target=console --log-level=info
"""


@dataclass
class Systemd:
    init_pid: int  # the namespace's PID 1 (systemd), as this host numbers it
    home: Path  # FERRY_HOME of an admin client for the agent
    port: int

    def ctl(self, *args: str, check: bool = True) -> str:
        cmd = ["nsenter", "-t", str(self.init_pid), "-m", "-p", "systemctl", *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0 or not check, (args, done.stdout, done.stderr)
        return done.stdout

    def show(self, check: bool = True) -> dict[str, str]:
        props = "ActiveState,SubState,Result,MainPID,NRestarts,StatusText,Type,WatchdogUSec"
        out = self.ctl("show", "ferry-agent", "-p", props, "--no-pager", check=check)
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait(self, ok: Callable[[dict[str, str]], bool], timeout: float = 120) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            state = self.show(check=False)  # systemd may not listen yet
            if state and ok(state):
                return state
            assert time.monotonic() < deadline, state
            time.sleep(0.3)

    def ferry(self, *args: str) -> str:
        env = dict(os.environ, FERRY_HOME=str(self.home))
        done = subprocess.run([sys.executable, "-m", "ferry", *args], env=env, text=True,
                              capture_output=True, timeout=180, check=False)  # fmt: skip
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def _qemu_pid(uuid: str) -> int | None:
    """The host pid of the QEMU running VM ``uuid`` (it lives in the namespace)."""
    pids = qemu_pids_for(uuid)
    assert len(pids) <= 1, pids
    return pids[0] if pids else None


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[Systemd]:
    assert SYSTEMD.exists(), f"{SYSTEMD} is missing: apt-get install -y systemd"
    port = loopback.free_port()
    etc = tmp_path / "etc-ferry"
    create_ca(tmp_path / "ca")
    issue_host_cert(tmp_path / "ca", etc / "tls", "svc-1", ips=["127.0.0.1"])
    config = {"name": "svc-1", "listen": f"127.0.0.1:{port}", "data_dir": "/var/lib/ferry",
              "tls_dir": "/etc/ferry/tls", "accelerator": "tcg",
              "run_dir": "/run/ferry"}  # fmt: skip
    (etc / "host.toml").write_text(tomli_w.dumps(config))
    units = tmp_path / "units"
    (units / "ferry-agent.service.d").mkdir(parents=True)
    (units / "ferry-agent.service").write_text(agent_unit())  # as packaged
    (units / "ferry-agent.service.d" / "test.conf").write_text(textwrap.dedent(f"""\
        [Unit]
        DefaultDependencies=no
        [Service]
        ExecStart=
        ExecStart={sys.executable} -m ferry agent --config /etc/ferry/host.toml --log-format json
        WatchdogSec=4s
        """))  # fmt: skip
    (units / "ferry-test.target").write_text(
        "[Unit]\nDescription=ferry unit test\nDefaultDependencies=no\nWants=ferry-agent.service\n"
    )
    inner = tmp_path / "inner.sh"
    inner.write_text(INNER.format(masked=" ".join(MASKED), systemd=SYSTEMD))
    inner.chmod(0o755)
    home = tmp_path / "home"
    issue_admin_cert(tmp_path / "ca", home / "admin")
    entry = HostEntry(url=f"https://127.0.0.1:{port}", server_name="svc-1")
    save_settings(ClientSettings(admin_tls_dir=home / "admin", hosts={"svc-1": entry}), home)
    log = (tmp_path / "pid1.log").open("wb")
    outer = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "--uts", "--ipc",
         str(inner), str(tmp_path)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    init_pid = 0
    try:
        deadline = time.monotonic() + 30
        while not init_pid:
            assert outer.poll() is None, (tmp_path / "pid1.log").read_text()
            assert time.monotonic() < deadline, "no PID 1 in the namespace"
            kids = _children(outer.pid)
            if kids and Path(f"/proc/{kids[0]}/exe").resolve().name == "systemd":
                init_pid = kids[0]
            time.sleep(0.1)
        yield Systemd(init_pid=init_pid, home=home, port=port)
    finally:
        # SIGKILL of a PID namespace's init ends every process in it (agent, QEMU).
        if init_pid:
            os.kill(init_pid, signal.SIGKILL)
        outer.wait(timeout=30)
        log.close()


def test_the_unit_runs_under_systemd_with_a_qemu(systemd: Systemd) -> None:
    s = systemd
    # Type=notify: active only once READY=1 came, and by then the port answers.
    first = s.wait(lambda p: p["ActiveState"] == "active")
    assert first["Type"] == "notify" and first["WatchdogUSec"] == "4s", first
    assert first["StatusText"] == f"serving https://127.0.0.1:{s.port}", first
    out = s.ferry("vm", "create", "sd", "--host", "svc-1", "--memory", "64M", "--disk", "64M",
                  "--start")  # fmt: skip
    assert "running" in out, out
    (vm,) = json.loads(s.ferry("vm", "list", "--json"))
    qemu = _qemu_pid(vm["uuid"])
    assert qemu is not None and vm["state"] == "running"

    # A crash (SIGKILL of the agent): Restart=on-failure brings it back, the VM ran on.
    s.ctl("kill", "--signal=SIGKILL", "--kill-whom=main", "ferry-agent")
    after = s.wait(lambda p: p["NRestarts"] == "1" and p["ActiveState"] == "active")
    assert after["MainPID"] != first["MainPID"]
    assert _qemu_pid(vm["uuid"]) == qemu
    assert json.loads(s.ferry("vm", "list", "--json"))[0]["state"] == "running"

    # A hung event loop (SIGSTOP): no watchdog ping, systemd kills and restarts it.
    s.ctl("kill", "--signal=SIGSTOP", "--kill-whom=main", "ferry-agent")
    hung = s.wait(lambda p: p["NRestarts"] == "2" and p["ActiveState"] == "active", timeout=60)
    assert hung["MainPID"] != after["MainPID"]
    assert _qemu_pid(vm["uuid"]) == qemu

    # systemctl stop ends the agent cleanly (STOPPING=1) and leaves the guest running
    # (KillMode=process); a start re-attaches to it.
    s.ctl("stop", "ferry-agent")
    stopped = s.show()
    assert (stopped["ActiveState"], stopped["Result"]) == ("inactive", "success"), stopped
    assert _qemu_pid(vm["uuid"]) == qemu
    s.ctl("start", "ferry-agent")
    s.wait(lambda p: p["ActiveState"] == "active")
    assert json.loads(s.ferry("vm", "list", "--json"))[0]["state"] == "running"
    assert _qemu_pid(vm["uuid"]) == qemu
