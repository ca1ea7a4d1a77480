"""Replication lag over time: the web server samples ``replication status`` of every replicated VM.

The agents keep no history of lag, only its current value, so while the
console runs it asks every ``interval_s`` (``ferry replication status`` on the
VM's primary; on the replica host when the primary does not answer) and keeps
the last ``keep`` samples per VM in memory. The VM page plots them and the
overview reads the latest status for its alerts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ferry.core.tasks import cancel_and_wait
from ferry.errors import FerryError

if TYPE_CHECKING:
    from ferry.web.operations import Operations

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 5.0
DEFAULT_KEEP = 720  # an hour at the default interval


@dataclass(frozen=True)
class Sample:
    time: float
    lag_s: float | None  # None until the first cycle succeeded


def _pick(views: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The view whose host reports the relationship best: the primary, else a replica."""
    ranked = sorted(
        (v for v in views if v.get("replication")),
        key=lambda v: (v["replication"].get("role") != "primary", bool(v.get("incoming"))),
    )
    return ranked[0] if ranked else None


class LagSampler:
    """Samples of every replicated VM's lag, by VM name."""

    def __init__(
        self,
        ops: Operations,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        keep: int = DEFAULT_KEEP,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ops = ops
        self.interval_s = interval_s
        self._keep = keep
        self._clock = clock
        self._series: dict[str, deque[Sample]] = {}
        self._latest: dict[str, dict[str, Any]] = {}
        self._task: asyncio.Task[None] | None = None

    def series(self, vm: str) -> list[Sample]:
        return list(self._series.get(vm, ()))

    def latest(self) -> dict[str, dict[str, Any]]:
        """The last status seen of each replicated VM."""
        return dict(self._latest)

    async def sample_once(self) -> None:
        listing = await self.ops.vms()
        by_name: dict[str, list[dict[str, Any]]] = {}
        for view in listing.items:
            by_name.setdefault(view["name"], []).append(view)
        chosen = {name: _pick(views) for name, views in by_name.items()}
        wanted = [(v["host"], name) for name, v in chosen.items() if v is not None]
        now = self._clock()
        for (host, name), status in (await self.ops.gather_replication(wanted)).items():
            if isinstance(status, FerryError):
                log.debug("no replication status of %s on %s: %s", name, host, status)
                continue
            self._latest[name] = status
            series = self._series.setdefault(name, deque(maxlen=self._keep))
            series.append(Sample(now, status.get("lag_s")))
        for gone in set(self._latest) - {name for _, name in wanted}:
            del self._latest[gone]  # its history stays until the console ends

    async def _run(self) -> None:
        while True:
            try:
                await self.sample_once()
            except FerryError as exc:
                log.warning("sampling replication lag: %s", exc)
            await asyncio.sleep(self.interval_s)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="ferry-web-lag-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
