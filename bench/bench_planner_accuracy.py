"""Planner accuracy: ``ferry plan create``'s predicted time and downtime against the move it plans.

Run: ``.venv/bin/python bench/bench_planner_accuracy.py [--runs 1] [--only s1,s3]``

Two lab hosts. For each scenario one test guest runs alone on host-1 (memory,
how much of it the guest keeps dirtying, disk size and data, storage), then
``ferry plan create --from host-1 --to host-2`` predicts the step (its
``estimate_s`` and ``downtime_s``, from the measured dirty rate, sizes and
the bandwidth probe) and ``ferry plan apply`` carries it out; the measured
figures are the move's own result (``total_s``, ``downtime_ms``: the pause the
guest lived through). Prints one row per run and the error of each
prediction against the measurement; the goal is within 30%. Numbers only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ferry.guest.build import dirty_memory_param, ensure_guest
from ferry.lab import Lab

M = 1024**2
GOAL = 0.30


def ferry(home: Path, *args: str) -> str:
    env = dict(os.environ, FERRY_HOME=str(home))
    done = subprocess.run([sys.executable, "-m", "ferry", *args], text=True,
                          capture_output=True, env=env)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"ferry {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def make_data_image(path: Path, size: str, data: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    subprocess.run(["qemu-io", "-c", f"write -P 0x5a 0 {data}", str(path)], check=True,
                   capture_output=True)  # fmt: skip


def wait_console(home: Path, name: str, text: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while text not in json.loads(ferry(home, "vm", "console", name, "--json"))["text"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{text!r} never appeared on the console of {name}")
        time.sleep(1)


def one_run(home: Path, root: Path, name: str, create: list[str]) -> dict[str, Any]:
    ferry(home, "vm", "create", name, "--host", "host-1", "--guest", "test", *create, "--start")
    wait_console(home, name, "seq 3")
    time.sleep(2)  # a dirtying guest is at its steady rate once it has written a while
    plan = root / f"{name}.json"
    ferry(home, "plan", "create", "--from", "host-1", "--to", "host-2", "-o", str(plan))
    step = json.loads(plan.read_text())["steps"][0]
    lines = ferry(home, "plan", "apply", str(plan), "--json").splitlines()
    report = json.loads(lines[-1])
    if report["result"] != "ok":
        raise RuntimeError(f"apply of {name}: {report['error']}")
    result = report["steps"][0]["result"]
    ferry(home, "vm", "kill", name)
    ferry(home, "vm", "delete", name)
    return {"vm": name, "option": step["option"], "storage": step.get("storage"),
            "predicted_s": step["estimate_s"], "predicted_down_s": step["downtime_s"],
            "measured_s": result["total_s"], "measured_down_s": result["downtime_ms"] / 1000,
            # Where the measured time went (the model's terms: set-up, disks, memory).
            "disk_copy_s": result.get("disk_copy_s"), "memory_copy_s": result.get("memory_copy_s"),
            "load": os.getloadavg()[0], "warnings": step.get("warnings", [])}  # fmt: skip


def error(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured if measured else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--only", default=None, help="Comma-separated scenario keys.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ferry-bench-plan-") as tmp:
        root = Path(tmp)
        home = root / "home"
        os.environ["FERRY_HOME"] = str(home)
        cache = Path(os.environ.get("FERRY_GUEST_CACHE") or root / "guest")
        os.environ["FERRY_GUEST_CACHE"] = str(cache)
        ensure_guest(cache)
        lab = Lab(root / "lab")
        lab.up(2)
        try:
            image = lab.images_dir / "data.qcow2"
            make_data_image(image, "1G", "512M")
            dirty = ["--append", dirty_memory_param(64 * M)]
            dirty_big = ["--append", dirty_memory_param(128 * M)]
            scenarios = {
                "s1": ("256M idle, 32M disk, copy", ["--memory", "256M", "--disk", "32M"]),
                "s2": ("768M idle, 32M disk, copy", ["--memory", "768M", "--disk", "32M"]),
                "s3": ("256M dirtying 64M, 32M disk, copy",
                       ["--memory", "256M", "--disk", "32M", *dirty]),
                "s4": ("256M idle, 1G disk with 512M data, copy",
                       ["--memory", "256M", "--image", str(image)]),
                "s5": ("512M dirtying 128M, shared volume",
                       ["--memory", "512M", "--disk", "32M", "--volume", "shared", *dirty_big]),
            }  # fmt: skip
            only = set(args.only.split(",")) if args.only else None
            rows = []
            for key, (label, create) in scenarios.items():
                if only is not None and key not in only:
                    continue
                for run in range(args.runs):
                    row = one_run(home, root, f"acc-{key}{run}", create)
                    row["scenario"] = f"{key} {label}"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            print()
            print(f"{'scenario':<48} {'option':<15} {'time pred/meas s':>18} {'err':>6} "
                  f"{'downtime pred/meas s':>22} {'err':>6}")  # fmt: skip
            within = 0
            for row in rows:
                e_t = error(row["predicted_s"], row["measured_s"])
                e_d = error(row["predicted_down_s"], row["measured_down_s"])
                within += abs(e_t) <= GOAL and abs(e_d) <= GOAL
                opt = f"{row['option']}/{row['storage']}"
                print(f"{row['scenario']:<48} {opt:<15} "
                      f"{row['predicted_s']:>8.2f}/{row['measured_s']:<8.2f} {e_t:>+6.0%} "
                      f"{row['predicted_down_s']:>10.3f}/{row['measured_down_s']:<10.3f} "
                      f"{e_d:>+6.0%}")  # fmt: skip
            print(f"\n{within} of {len(rows)} runs within {GOAL:.0%} on both time and downtime "
                  f"(load average {min(r['load'] for r in rows):.1f}-"
                  f"{max(r['load'] for r in rows):.1f})")  # fmt: skip
        finally:
            lab.down()


if __name__ == "__main__":
    main()
