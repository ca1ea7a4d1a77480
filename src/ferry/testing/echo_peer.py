"""A lab peer that keeps one TCP connection to a guest's echo service and times its stalls.

Run inside the lab network's namespace (``ferry lab exec -- python -m
ferry.testing.echo_peer IP``): it connects once to ``IP:7``, sends a
numbered line every ``--interval`` seconds and reads the echoes back; it
never reconnects, so a connection that breaks is an error, not a retry.
Beside it, a raw socket on the lab bridge (``--bridge``) counts the RARP
frames a MAC announces (QEMU's ``announce-self``).

Protocol on its stdin/stdout (one JSON document a line on stdout):

* once connected and the first echo is back: ``{"event": "ready"}``;
* ``mark`` on stdin: ``{"event": "mark", "received": N, "rarp": R, "stall_ms": S}``
  (how far it got, and the longest stall since the last mark);
* ``stop`` on stdin (or EOF): stops sending, waits up to ``--drain`` seconds
  for the outstanding echoes, prints ``{"event": "done", "sent", "received",
  "in_order", "longest_stall_ms", "stalls": [[at_s, ms], ...], "rarp": [...],
  "error"}`` and exits (0 if every line came back in order).

``longest_stall_ms`` is the longest time between two echoes arriving while
lines kept being sent (about the outage plus one interval).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

ETH_P_RARP = 0x8035
STALL_REPORT_MS = 100.0  # gaps longer than this are listed one by one


class Peer:
    def __init__(self, host: str, port: int, interval: float, mac: str | None,
                 bridge: str | None) -> None:  # fmt: skip
        self.host, self.port, self.interval = host, port, interval
        self.mac = bytes.fromhex(mac.replace(":", "")) if mac else None
        self.bridge = bridge
        self.started = time.monotonic()
        self.sent = 0
        self.received = 0
        self.in_order = True
        self.error: str | None = None
        self.last_echo: float | None = None
        self.longest_stall = 0.0
        self.window_stall = 0.0  # since the last mark
        self.stalls: list[list[float]] = []
        self.rarp: list[float] = []
        self.sending = threading.Event()
        self.sending.set()
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None

    def say(self, doc: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()

    # -- the connection --------------------------------------------------------------

    def connect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.create_connection((self.host, self.port), timeout=5)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise OSError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
                time.sleep(0.5)
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send_loop(self) -> None:
        assert self.sock is not None
        next_at = time.monotonic()
        while self.sending.is_set():
            with self.lock:
                seq = self.sent + 1
                self.sent = seq
            try:
                self.sock.sendall(f"{seq}\n".encode())
            except OSError as exc:
                self.error = self.error or f"send {seq}: {exc}"
                self.sending.clear()
                return
            next_at += self.interval
            time.sleep(max(0.0, next_at - time.monotonic()))

    def read_loop(self, ready: threading.Event) -> None:
        assert self.sock is not None
        buffer = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError as exc:
                self.error = self.error or f"receive: {exc}"
                return
            if not chunk:
                if self.received < self.sent:
                    self.error = self.error or "the guest closed the connection"
                return
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            now = time.monotonic()
            for line in lines:
                text = line.strip().decode(errors="replace")
                if not text:
                    continue
                expected = self.received + 1
                if text != str(expected):
                    self.in_order = False
                    self.error = self.error or f"echo {text!r} where {expected} was due"
                self.received = expected
                if self.last_echo is not None and self.sending.is_set():
                    gap = (now - self.last_echo) * 1000
                    self.longest_stall = max(self.longest_stall, gap)
                    self.window_stall = max(self.window_stall, gap)
                    if gap > STALL_REPORT_MS:
                        self.stalls.append([round(now - self.started, 3), round(gap, 1)])
                self.last_echo = now
                ready.set()

    # -- RARP frames on the bridge -----------------------------------------------------

    def sniff_loop(self) -> None:
        if self.bridge is None:
            return
        try:
            raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_RARP))
            raw.bind((self.bridge, 0))
        except OSError as exc:
            self.error = self.error or f"cannot watch bridge {self.bridge}: {exc}"
            return
        raw.settimeout(0.5)
        while True:
            try:
                frame = raw.recv(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(frame) < 14 or struct.unpack("!H", frame[12:14])[0] != ETH_P_RARP:
                continue
            if self.mac is None or frame[6:12] == self.mac:
                self.rarp.append(round(time.monotonic() - self.started, 3))

    # -- the run -----------------------------------------------------------------------

    def run(self, connect_timeout: float, drain: float) -> int:
        threading.Thread(target=self.sniff_loop, daemon=True).start()
        try:
            self.connect(connect_timeout)
        except OSError as exc:
            self.error = str(exc)
            return self.finish()
        ready = threading.Event()
        reader = threading.Thread(target=self.read_loop, args=(ready,), daemon=True)
        reader.start()
        sender = threading.Thread(target=self.send_loop, daemon=True)
        sender.start()
        if not ready.wait(connect_timeout):
            self.error = self.error or "no echo came back"
            self.sending.clear()
            return self.finish()
        self.say({"event": "ready"})
        for line in sys.stdin:
            command = line.strip()
            if command == "mark":
                stall = round(self.window_stall, 1)
                self.say({"event": "mark", "received": self.received, "rarp": len(self.rarp),
                          "stall_ms": stall, "error": self.error})  # fmt: skip
                self.window_stall = 0.0
            elif command == "stop":
                break
        self.sending.clear()
        sender.join()
        deadline = time.monotonic() + drain
        while self.received < self.sent and time.monotonic() < deadline and self.error is None:
            time.sleep(0.05)
        if self.received < self.sent and self.error is None:
            self.error = f"{self.sent - self.received} lines never came back"
        return self.finish()

    def finish(self) -> int:
        self.say({"event": "done", "sent": self.sent, "received": self.received,
                  "in_order": self.in_order, "longest_stall_ms": round(self.longest_stall, 1),
                  "stalls": self.stalls, "rarp": self.rarp, "error": self.error})  # fmt: skip
        if self.sock is not None:
            self.sock.close()
        return 0 if self.error is None else 1


class PeerProcess:
    """A running peer (started by a test or a benchmark), driven over its stdin/stdout.

    ``argv`` runs the peer in the lab namespace, e.g.
    ``netdev.exec_argv(lab.netns, [sys.executable, "-m", "ferry.testing.echo_peer", IP])``.
    :meth:`close` ends it by pid if it is still there.
    """

    def __init__(self, argv: list[str]) -> None:
        # Its own session: ``ferry lab exec`` runs the peer as a child, and
        # close() must end both (by this process group's id).
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1, start_new_session=True)  # fmt: skip
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.lines.put(json.loads(line))
        self.lines.put(None)

    def _next(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                doc = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"the echo peer said no {event!r} in {timeout:.0f} s") from None
            if doc is None:
                raise RuntimeError(f"the echo peer ended before {event!r}")
            if doc.get("event") == event or doc.get("event") == "done":
                return doc

    def _tell(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def wait_ready(self, timeout: float = 90) -> dict[str, Any]:
        """Connected, and the first echo came back (else the peer's ``done`` with its error)."""
        return self._next("ready", timeout)

    def mark(self, timeout: float = 10) -> dict[str, Any]:
        self._tell("mark")
        return self._next("mark", timeout)

    def stop(self, timeout: float = 60) -> dict[str, Any]:
        """Stop sending, wait for the last echoes; the peer's report."""
        self._tell("stop")
        done = self._next("done", timeout)
        self.proc.wait(timeout)
        return done

    def close(self) -> None:
        """End the peer: EOF on its stdin stops it; what is left after 40 s is killed."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(40)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._reader.join(10)  # it reads to the end of the peer's output
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("--port", type=int, default=7)
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between lines")
    parser.add_argument("--mac", help="count RARP frames from this MAC only")
    parser.add_argument("--bridge", help="the bridge to watch for RARP frames")
    parser.add_argument("--connect-timeout", type=float, default=60.0)
    parser.add_argument("--drain", type=float, default=30.0)
    args = parser.parse_args(argv)
    peer = Peer(args.host, args.port, args.interval, args.mac, args.bridge)
    return peer.run(args.connect_timeout, args.drain)


if __name__ == "__main__":
    sys.exit(main())
