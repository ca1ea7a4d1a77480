"""Failover benchmark: time to the guest's ``up`` line, and what reverse replication sends.

Run: ``.venv/bin/python bench/bench_failover.py``

A lab of two hosts that accept replication from each other, a test guest on
host-1 with a 1 GiB disk holding 256 MiB of random data, replicated to host-2
every 30 s. In the same run:

1. baseline: ``vm start`` of a plain copy of the VM on host-2 -> its ``up`` line;
2. unplanned: host-1's agent and QEMU are killed, then ``failover start`` on
   host-2 -> the guest's ``up`` line (then ``cancel``, host-1 comes back);
3. planned: ``failover planned`` from host-1 (shut down, last delta, start on
   host-2, reverse); the reverse initial copy's bytes against the disk size.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ferry.lab import Lab

MiB = 1024**2
UP = re.compile(r"ferry-guest up last-seq=\d+")


def ferry(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "ferry", *args], env=env,
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"ferry {' '.join(args)}: {result.stderr.strip()}")
    return result


def ferry_json(*args: str, env: dict[str, str]) -> Any:
    return json.loads(ferry(*args, "--json", env=env).stdout.splitlines()[-1])


def seconds_to_up(name: str, host: str, env: dict[str, str], since: float) -> float:
    while True:
        text = ferry("vm", "console", name, "--host", host, env=env).stdout
        if UP.search(text):
            return time.monotonic() - since
        if time.monotonic() - since > 120:
            raise SystemExit(f"{name} on {host} never came up")
        time.sleep(0.05)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="ferry-bench-f-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        env = dict(os.environ, FERRY_HOME=str(root / "home"))
        os.environ["FERRY_HOME"] = env["FERRY_HOME"]
        lab = Lab(root / "lab")
        lab.up(2)
        try:
            run(lab, root, env)
        finally:
            lab.down()


def run(lab: Lab, root: Path, env: dict[str, str]) -> None:
    for me, other in (("host-1", "host-2"), ("host-2", "host-1")):
        ferry("replica-server", "enable", "--host", me, "--storage", str(root / me), "--allow",
              other, env=env)  # fmt: skip
    image = lab.images_dir / "data.qcow2"
    raw = root / "data.raw"
    raw.write_bytes(b"")
    with raw.open("r+b") as handle:
        handle.truncate(1024 * MiB)
        handle.seek(128 * MiB)
        handle.write(os.urandom(256 * MiB))
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(image)],
                   check=True)  # fmt: skip
    raw.unlink()
    for name in ("fo", "plain"):
        host = "host-1" if name == "fo" else "host-2"
        ferry("vm", "create", name, "--host", host, "--guest", "test", "--memory", "128M",
              "--image", str(image), env=env)  # fmt: skip
    # 1. baseline: a plain start of the same VM on host-2
    started = time.monotonic()
    ferry("vm", "start", "plain", env=env)
    baseline = seconds_to_up("plain", "host-2", env, started)
    ferry("vm", "delete", "plain", "--force", env=env)

    ferry("vm", "start", "fo", env=env)
    seconds_to_up("fo", "host-1", env, time.monotonic())
    ferry("replication", "enable", "fo", "--replica", "host-2", "--frequency", "30s", env=env)
    time.sleep(2)
    ferry("replication", "sync", "fo", env=env)

    # 2. unplanned: host-1 is lost
    pid = ferry_json("vm", "show", "fo", "--host", "host-1", env=env)["pid"]
    agent = lab.host(1).pid()
    assert agent is not None
    os.kill(agent, signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)
    while lab.host(1).pid() is not None:
        time.sleep(0.1)
    started = time.monotonic()
    ferry("failover", "start", "fo", env=env)
    unplanned = seconds_to_up("fo", "host-2", env, started)
    ferry("failover", "cancel", "fo", env=env)
    lab.up(2)
    ferry("vm", "start", "fo", "--host", "host-1", env=env)
    seconds_to_up("fo", "host-1", env, time.monotonic())
    time.sleep(2)
    ferry("replication", "sync", "fo", env=env)  # the bitmap was lost: a resync

    # 3. planned failover and the reverse initial copy
    started = time.monotonic()
    result = ferry_json("failover", "planned", "fo", env=env)
    planned = seconds_to_up("fo", "host-2", env, started)
    deadline = time.monotonic() + 300
    while True:
        jobs = ferry_json("job", "list", "--host", "host-2", env=env)
        mine = [j for j in jobs if j["vm"] == "fo" and j["kind"] == "replication-initial"]
        if mine and mine[-1]["state"] in ("done", "failed"):
            break
        if time.monotonic() > deadline:
            raise SystemExit("the reverse initial copy never finished")
        time.sleep(0.5)
    reverse = mine[-1]
    disk = 1024 * MiB
    print(f"failover start -> up: {unplanned:.2f} s; plain vm start -> up: {baseline:.2f} s; "
          f"ratio {unplanned / baseline:.2f}")  # fmt: skip
    print(f"planned failover -> up on host-2: {planned:.2f} s (job total "
          f"{result['total_s']:.2f} s)")  # fmt: skip
    sent = reverse.get("bytes_sent", 0)
    print(
        f"reverse replication initial copy: {reverse['state']}, {sent} bytes "
        f"({sent / 1024:.1f} KiB) sent for a {disk // MiB} MiB disk holding 256 MiB of data: "
        f"{sent / disk:.6f} of the disk"
    )


if __name__ == "__main__":
    main()
