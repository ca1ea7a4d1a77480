"""Foundation benchmark: guest boot through ferry, and ``vm list`` latency.

Run: ``.venv/bin/python bench/bench_foundation.py [--boots 3] [--vms 100]``

1. Time from ``vm start`` (API call sent) to the guest's ``ferry-guest up``
   line, against the same guest booted by hand with the same QEMU options in
   the same run (baseline): ratio ferry / hand.
2. ``vm list`` latency on a host with N defined VMs: through the API (one
   client, kept connection) and through the CLI (a new process each time),
   against the cheapest authenticated call (``/v1/peer/hello``) as baseline.
Prints numbers only; nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ferry.adapters import pki
from ferry.client.agent_client import AgentClient
from ferry.guest.build import ensure_guest
from ferry.host.config import load_host_config
from ferry.lab import Lab

UP = b"ferry-guest up"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _wait_console(client: AgentClient, name: str) -> None:
    offset = 0
    while True:
        chunk = await client.get(f"/v1/vms/{name}/console", offset=str(offset))
        if "ferry-guest up" in chunk["text"]:
            return
        offset = chunk["offset"]
        await asyncio.sleep(0.05)


async def boot_through_ferry(client: AgentClient, runs: int) -> list[float]:
    """Boot a fresh VM (blank disk) per run, so the guest's disk scan is the same."""
    times = []
    for run in range(runs):
        name = f"boot-{run}"
        await client.call("POST", "/v1/vms", body={
            "name": name, "memory": 256 * 1024**2, "guest": "test",
            "disks": [{"size": 256 * 1024**2}]})  # fmt: skip
        started = time.monotonic()
        await client.post(f"/v1/vms/{name}/start")
        await _wait_console(client, name)
        times.append(time.monotonic() - started)
        await client.post(f"/v1/vms/{name}/kill")
    return times


def boot_by_hand(guest_cache: Path, workdir: Path, runs: int) -> list[float]:
    guest = ensure_guest(guest_cache)
    disk = workdir / "hand.qcow2"
    times = []
    for _ in range(runs):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "256M"], check=True)
        log = workdir / "hand.log"
        log.unlink(missing_ok=True)
        argv = [
            "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
            "-machine", "pc-q35-7.2,accel=tcg", "-cpu", "max", "-m", "256M", "-nic", "none",
            "-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-append", guest.append,
            "-serial", f"file:{log}",
            "-blockdev", f"driver=file,filename={disk},node-name=file0",
            "-blockdev", "driver=qcow2,file=file0,node-name=disk0",
            "-device", "virtio-blk-pci,drive=disk0,id=vblk0",
        ]  # fmt: skip
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            while not (log.exists() and UP in log.read_bytes()):
                time.sleep(0.02)
            times.append(time.monotonic() - started)
        finally:
            proc.kill()
            proc.wait()
    return times


async def list_latency(client: AgentClient, samples: int) -> tuple[list[float], list[float]]:
    list_times, hello_times = [], []
    for _ in range(samples):
        started = time.perf_counter()
        await client.get("/v1/peer/hello")
        hello_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        await client.get("/v1/vms")
        list_times.append(time.perf_counter() - started)
    return list_times, hello_times


def cli_list_latency(home: Path, samples: int) -> list[float]:
    env = dict(os.environ, FERRY_HOME=str(home))
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ferry", "vm", "list", "--host", "host-1",
                        "--json"], check=True, capture_output=True, env=env)  # fmt: skip
        times.append(time.perf_counter() - started)
    return times


async def run(args: argparse.Namespace, root: Path, lab: Lab) -> None:
    address, port = load_host_config(lab.host(1).config_path).address
    tls = pki.client_ssl_context(lab.admin_dir)
    async with AgentClient("host-1", f"https://{address}:{port}", tls) as client:
        ferry_boot = await boot_through_ferry(client, args.boots)
        hand_boot = boot_by_hand(args.guest_cache, root, args.boots)
        f_med, h_med = statistics.median(ferry_boot), statistics.median(hand_boot)
        print(f"boot to 'up' line, median of {args.boots}: ferry {f_med:.2f}s, "
              f"by hand {h_med:.2f}s, ratio {f_med / h_med:.2f}")  # fmt: skip

        for index in range(args.vms - 1):
            await client.call("POST", "/v1/vms", body={"name": f"idle-{index:03d}"})
        list_times, hello_times = await list_latency(client, args.samples)
        cli_times = cli_list_latency(Path(os.environ["FERRY_HOME"]), max(5, args.samples // 20))
    for label, values in (("API vm list", list_times), ("API peer hello", hello_times),
                          ("CLI vm list", cli_times)):  # fmt: skip
        print(f"{label} ({args.vms} VMs, n={len(values)}): p50 {_pct(values, .5) * 1e3:.1f} ms, "
              f"p99 {_pct(values, .99) * 1e3:.1f} ms")  # fmt: skip
    ratio = _pct(list_times, 0.5) / _pct(hello_times, 0.5)
    print(f"ratio API vm list / peer hello (p50): {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--vms", type=int, default=100)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ferry-bench-") as tmp:
        root = Path(tmp)
        os.environ["FERRY_HOME"] = str(root / "home")
        args.guest_cache = Path(os.environ.get("FERRY_GUEST_CACHE") or root / "guest")
        os.environ["FERRY_GUEST_CACHE"] = str(args.guest_cache)
        ensure_guest(args.guest_cache)
        lab = Lab(root / "lab")
        try:
            lab.up(1)
            asyncio.run(run(args, root, lab))
        finally:
            lab.down()


if __name__ == "__main__":
    main()
