"""A live move between clusters next to a plain shared-nothing move of the same VM size.

A throw-away lab of four hosts: cluster c1 (host-1, host-2) and c2 (host-3,
host-4), each with its own volume csv1. Each run moves a clustered test guest
c1 -> c2 and back (``vm move --to-cluster``, its disk copied onto the other
cluster's volume) and, between those, a plain VM of the same size host-1 ->
host-2 and back (``vm move --storage copy``), so both kinds meet the same
load. Prints every move's total, downtime and (crossings) ``unprotected_s``,
then the medians and the ratios crossing / plain. Issue 13's goal: the
crossing costs about what the plain move does, and ``unprotected_s`` is 0.

    .venv/bin/python bench/bench_cluster_crossing.py --runs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench_lab import bench_lab, ferry


def last_json(text: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(text.strip().splitlines()[-1])
    return result


def move(home: Path, *args: str) -> dict[str, Any]:
    return last_json(ferry(home, "vm", "move", *args, "--json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="Round trips of each kind.")
    parser.add_argument("--memory", default="128M")
    args = parser.parse_args()
    clusters = {"c1": ["host-1", "host-2"], "c2": ["host-3", "host-4"]}
    with bench_lab("ferry-bench-crossing-", 4, clusters=clusters, lease_ttl_s=4) as (home, _):
        common = ("--guest", "test", "--memory", args.memory, "--disk", "32M", "--start")
        ferry(home, "vm", "create", "crosser", "--cluster", "c1", "--volume", "csv1",
              "--host", "host-1", *common)  # fmt: skip
        ferry(home, "vm", "create", "plain", "--host", "host-1", *common)
        time.sleep(10)  # both guests booted and writing
        crossing: list[dict[str, Any]] = []
        plain: list[dict[str, Any]] = []
        for _ in range(args.runs):
            crossing.append(move(home, "crosser", "--to-cluster", "c2", "--to", "host-3"))
            plain.append(move(home, "plain", "--to", "host-2", "--storage", "copy"))
            crossing.append(move(home, "crosser", "--to-cluster", "c1", "--to", "host-1"))
            plain.append(move(home, "plain", "--to", "host-1", "--storage", "copy"))
        for kind, results in (("crossing", crossing), ("plain", plain)):
            for r in results:
                extra = f" unprotected {r['unprotected_s']} s" if kind == "crossing" else ""
                print(f"{kind:8} -> {r['host']}: total {r['total_s']:.2f} s, downtime "
                      f"{r['downtime_ms']} ms{extra}")  # fmt: skip
        total_c = statistics.median(r["total_s"] for r in crossing)
        total_p = statistics.median(r["total_s"] for r in plain)
        down_c = statistics.median(r["downtime_ms"] for r in crossing)
        down_p = statistics.median(r["downtime_ms"] for r in plain)
        worst = max(r["unprotected_s"] for r in crossing)
        print(f"median total: crossing {total_c:.2f} s, plain {total_p:.2f} s, ratio "
              f"{total_c / total_p:.2f}x")  # fmt: skip
        print(f"median downtime: crossing {down_c} ms, plain {down_p} ms, ratio "
              f"{down_c / max(down_p, 1):.2f}x")  # fmt: skip
        print(f"unprotected_s: at most {worst} over {len(crossing)} crossings")
        print(f"load: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
