"""Pins across a certificate renewal: which thumbprints count as one host's for a while.

When host R renews its certificate it tells each partner, over the old
channel, ``old -> new``. The partner rewrites the pins it keeps for R and,
for a grace period, treats both thumbprints as R's: calls already under way
present the old certificate, and a replication cycle in flight holds a copy
of its relationship with the old pin (it writes that copy back when it ends;
the pins are rewritten again once it has). A fixed grace period needs no
coordination between the hosts, and it lets no stolen certificate in:
``ferry pki renew`` revokes the old certificate's serial on every agent as
soon as R has switched, and a revoked certificate is refused whatever the
pins say.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from ferry.errors import InvalidInputError

GRACE_S = 600.0

_THUMBPRINT = re.compile(r"[0-9a-f]{64}")


def check_thumbprint(text: str) -> str:
    tp = text.lower().replace(":", "")
    if not _THUMBPRINT.fullmatch(tp):
        raise InvalidInputError(f"{text!r} is not a SHA-256 thumbprint (64 hex digits)")
    return tp


@dataclass(frozen=True)
class Renewal:
    """Host ``host`` renewed from certificate ``old`` to ``new``; both count until ``until``."""

    host: str
    old: str
    new: str
    until: float


class RenewedPins:
    """The renewals a host heard of, while their grace lasts."""

    def __init__(self, grace_s: float = GRACE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.grace_s = grace_s
        self._clock = clock
        self._renewals: list[Renewal] = []

    def add(self, host: str, old: str, new: str) -> Renewal:
        renewal = Renewal(host, old, new, self._clock() + self.grace_s)
        self._renewals = [*self._live(), renewal]
        return renewal

    def _live(self) -> list[Renewal]:
        now = self._clock()
        return [r for r in self._renewals if r.until > now]

    def current(self, host: str, thumbprint: str) -> str:
        """The newest thumbprint ``host``'s certificate ``thumbprint`` was renewed to."""
        seen = {thumbprint}
        for _ in range(len(self._renewals)):
            nxt = next((r.new for r in self._live() if r.host == host and r.old == thumbprint),
                       None)  # fmt: skip
            if nxt is None or nxt in seen:
                break
            seen.add(nxt)
            thumbprint = nxt
        return thumbprint

    def accepts(self, host: str, pinned: str, presented: str) -> bool:
        """Whether ``presented`` is ``host``'s certificate where ``pinned`` is the pin."""
        if pinned == presented:
            return True
        return self.current(host, pinned) == self.current(host, presented)

    @property
    def renewals(self) -> list[Renewal]:
        return self._live()
