"""One local etcd member on loopback with mutual TLS: for the lab and the integration tests.

Layout of its dir (chosen once, kept across restarts, so its URL never changes)::

    etcd.json   {"client_port", "peer_port"}
    tls/        server certificate for name "etcd" and IP 127.0.0.1, from the CA dir
    data/       etcd's data dir
    etcd.pid    the member's pid (a pid counts only while its cmdline names data/)
    etcd.log

Clients must present a certificate of the same CA (``--client-cert-auth``);
the peer URL is TLS on loopback too. Starting waits until ``/health`` answers;
stopping is by pid, SIGTERM then SIGKILL. Nothing here is for production:
a real cluster runs its own etcd members.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import time
import urllib.request
from pathlib import Path

from ferry.adapters import loopback, pki
from ferry.adapters.os_errors import os_errors
from ferry.errors import ConfigError

log = logging.getLogger(__name__)

ETCD_BINARY = "etcd"
MEMBER_NAME = "etcd"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0

# Members this process started, by pid: whichever EtcdServer object stops one
# reaps it (a test may stop the lab's etcd through an object of its own), so
# no ended child stays a zombie or is reported unwaited when collected.
_children: dict[int, subprocess.Popen[bytes]] = {}


class EtcdServer:
    """The etcd member living in ``directory``; its certificate comes from ``ca_dir``."""

    def __init__(self, directory: Path, ca_dir: Path, *, binary: str = ETCD_BINARY) -> None:
        self.dir = directory.resolve()
        self.ca_dir = ca_dir
        self.binary = binary
        self.tls_dir = self.dir / "tls"
        self.data_dir = self.dir / "data"
        self.pid_path = self.dir / "etcd.pid"
        self.log_path = self.dir / "etcd.log"

    # -- where ---------------------------------------------------------------

    def _ports(self) -> tuple[int, int]:
        """The client and peer ports: chosen the first time, then read back."""
        path = self.dir / "etcd.json"
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            saved = json.loads(path.read_text())
            return int(saved["client_port"]), int(saved["peer_port"])
        client, peer = loopback.free_port(), loopback.free_port()
        with os_errors(f"cannot write {path}"):
            self.dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"client_port": client, "peer_port": peer}) + "\n")
        return client, peer

    @property
    def configured(self) -> bool:
        """This member was made here once (its ports are chosen), running or not."""
        return (self.dir / "etcd.json").exists()

    @property
    def url(self) -> str:
        """The client URL (``https://127.0.0.1:PORT``)."""
        return f"https://127.0.0.1:{self._ports()[0]}"

    @property
    def peer_url(self) -> str:
        return f"https://127.0.0.1:{self._ports()[1]}"

    def pid(self) -> int | None:
        """The pid of this member if it runs (its cmdline names this data dir)."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if loopback.names(pid, self._marker) else None

    @property
    def _marker(self) -> bytes:
        return f"--data-dir={self.data_dir}".encode()

    # -- life cycle ----------------------------------------------------------

    def _argv(self) -> list[str]:
        tls = self.tls_dir
        ca, cert, key = tls / pki.CA_CERT, tls / pki.SERVER_CERT, tls / pki.SERVER_KEY
        return [
            self.binary,
            f"--name={MEMBER_NAME}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={MEMBER_NAME}={self.peer_url}",
            "--initial-cluster-state=new",
            "--client-cert-auth",
            f"--trusted-ca-file={ca}",
            f"--cert-file={cert}",
            f"--key-file={key}",
            "--peer-client-cert-auth",
            f"--peer-trusted-ca-file={ca}",
            f"--peer-cert-file={cert}",
            f"--peer-key-file={key}",
            # Progress notes keep an idle watch's stream talking, so a silently
            # dead connection shows as silence (EtcdStore's watch_idle_s).
            "--experimental-watch-progress-notify-interval=5s",
            "--logger=zap",
            "--log-outputs=stderr",
        ]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> int:
        """Start the member unless it runs; wait until it answers. Returns its pid."""
        running = self.pid()
        if running is not None:
            self._wait_healthy(None, timeout_s)
            return running
        if not (self.tls_dir / pki.SERVER_CERT).exists():
            pki.issue_host_cert(self.ca_dir, self.tls_dir, MEMBER_NAME, ips=["127.0.0.1"])
        with os_errors(f"cannot prepare {self.dir}"):
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            log_file = self.log_path.open("ab")
        with log_file:
            try:
                proc = subprocess.Popen(
                    self._argv(),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # outlives the CLI; stop() ends it by pid
                )
            except OSError as exc:
                raise ConfigError(
                    f"cannot run {self.binary}: {exc.strerror}; install etcd "
                    "(Debian package etcd-server)"
                ) from exc
        _children[proc.pid] = proc
        with os_errors(f"cannot write {self.pid_path}"):
            self.pid_path.write_text(f"{proc.pid}\n")
        try:
            self._wait_healthy(proc, timeout_s)
        except BaseException:
            self.stop()  # nothing half-started is left behind
            raise
        log.info("etcd started at %s (pid %d, dir %s)", self.url, proc.pid, self.dir)
        return proc.pid

    def _wait_healthy(self, proc: subprocess.Popen[bytes] | None, timeout_s: float) -> None:
        ctx = pki.client_ssl_context(self.tls_dir)  # the server pair is a client pair too
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while True:
            if proc is not None and proc.poll() is not None:
                raise ConfigError(
                    f"etcd exited at start (code {proc.returncode}): "
                    f"{_reason(loopback.last_line(self.log_path))} (log: {self.log_path})"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", context=ctx, timeout=2) as r:
                    if json.loads(r.read()).get("health") == "true":
                        return
                    last = "not healthy yet"
            except (OSError, ValueError) as exc:  # URLError is an OSError
                last = str(exc)
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"etcd at {self.url} did not answer within {timeout_s:.0f}s ({last}); "
                    f"log: {self.log_path}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """End the member by its pid: SIGTERM, then SIGKILL after a while. Idempotent."""
        pid = self.pid()
        if pid is not None:
            loopback.terminate(pid, self._marker, STOP_TIMEOUT_S)
        _reap(pid)
        self.pid_path.unlink(missing_ok=True)


def _reap(pid: int | None) -> None:
    """Wait for the member ``pid`` if this process started it, and for any that ended."""
    for child_pid, proc in list(_children.items()):
        if child_pid == pid or proc.poll() is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_TIMEOUT_S)
                del _children[child_pid]


def _reason(line: str) -> str:
    """etcd's last log line (zap JSON) as ``msg: error``."""
    try:
        record = json.loads(line)
    except ValueError:
        return line
    if not isinstance(record, dict):
        return line
    msg, error = record.get("msg", ""), record.get("error", "")
    return f"{msg}: {error}" if msg and error else str(msg or error or line)
