"""How a move's memory stream converges: auto-converge, and post-copy on request.

A guest that dirties memory faster than the link can carry never reaches
QEMU's downtime limit by copying alone. Two remedies, both QEMU's own:

- **auto-converge** (on by default): QEMU throttles the guest's vCPUs, more
  each round the dirty pages outrun the stream, until the rest fits in the
  downtime limit. The guest runs slower for the last rounds, then normally.
- **post-copy** (``vm move --postcopy``): after the first full pass the
  guest switches to the destination at once and the pages it has not got yet
  are fetched from the source on first touch. It always converges, and the
  pause is about one round trip plus the device state, but from the switch
  on the guest's memory is split over two hosts: **if the link or either
  host fails before the last page arrived, the VM is lost** (neither side
  holds all of it). Both QEMUs need the ``postcopy-ram`` capability.

The source starts post-copy (``migrate-start-postcopy``) once the first pass
is done (QEMU's ``dirty-sync-count`` has counted past 1), as libvirt's
``--postcopy-after-precopy`` does; with ``pause-before-switchover`` QEMU
still stops at ``pre-switchover`` first, so the mirrors complete as in a
pre-copy move.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Convergence:
    auto_converge: bool = True
    postcopy: bool = False

    def capabilities(self) -> list[dict[str, Any]]:
        """The source QEMU's migration capabilities for these choices."""
        caps: list[dict[str, Any]] = [{"capability": "auto-converge", "state": self.auto_converge}]
        if self.postcopy:
            caps.append({"capability": "postcopy-ram", "state": True})
        return caps
