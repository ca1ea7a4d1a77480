"""What the lab benchmarks share: a throw-away two-host lab, and the ferry CLI against it.

``with bench_lab("ferry-bench-x-") as (home, lab):`` makes a temporary dir
with ``$FERRY_HOME`` in it, the test guest (built once into the default
cache), a lab of ``hosts`` hosts that is up, and brings it down at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ferry.guest.build import default_cache_dir, ensure_guest
from ferry.lab import Lab


def ferry(home: Path, *args: str) -> str:
    """``ferry ARGS`` with ``home`` as $FERRY_HOME; its stdout (a failure raises)."""
    env = dict(os.environ, FERRY_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "ferry", *args], check=True, text=True,
                          capture_output=True, env=env).stdout  # fmt: skip


@contextmanager
def bench_lab(prefix: str, hosts: int = 2, **up: Any) -> Iterator[tuple[Path, Lab]]:
    """``up``: more of ``Lab.up``'s keywords (``clusters=``, ``lease_ttl_s=``)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        root = Path(tmp)
        home = root / "home"
        os.environ["FERRY_HOME"] = str(home)
        cache = default_cache_dir()
        os.environ["FERRY_GUEST_CACHE"] = str(cache)
        ensure_guest(cache)
        lab = Lab(root / "lab")
        try:
            lab.up(hosts, **up)
            yield home, lab
        finally:
            lab.down()
