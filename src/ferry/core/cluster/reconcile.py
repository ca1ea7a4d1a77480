"""What a node's reconciler does about one clustered VM: a pure decision.

Theory of operation. Each node compares, VM by VM, what the store says
(``owner``, ``want``) with what runs here, and :func:`decide` returns one
:class:`Action`. The rules keep the invariant "at most one QEMU writes a
clustered disk":

- Hands off anything *busy* here (migrating, incoming, a job on its disks, an
  operation holding its lock, starting or stopping): the job that holds it
  finishes the story.
- A VM runs here only while this node owns it. A live QEMU of a VM owned by
  another node is killed (``KILL``); an entry that is off is dropped
  (``FORGET``: the catalog entry and VM dir, never the shared disks).
- A VM this node owns is registered in the local catalog from its config
  (``REGISTER``, so every command finds it on its owner); one whose ``want``
  is ``running`` and that does not run here is started (``START``, registered
  first if absent), but only while this node holds its own lease
  (``self_ok``), and never while a move is pending. One whose ``want`` is
  ``off`` and that runs here is stopped (``STOP``: an ACPI power-down, as
  ``vm stop``; asked on another node, which only changed ``want``). The
  reconciler stops it only when ``want`` turned off after it saw the VM
  running, so a VM started here on purpose while ``want`` was already off
  (by a path that does not set it) runs on as before.
- A pending move (owner = destination with ``from`` = source) is settled by
  whichever side runs the VM: the destination that runs it confirms
  (``CONFIRM``); the source that runs it again takes it back (``RECLAIM``);
  a source that neither runs nor moves it lets the destination have it
  (``RELEASE``); a destination whose source node is gone (its lease expired,
  so its QEMUs are fenced) takes it (``TAKE``) and starts it on a later pass.
  Each of these is a compare-and-swap against the pending owner's revision,
  so the two sides never both win.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum

from ferry.core.cluster.roles import Owner, Want


class Action(StrEnum):
    NOTHING = "nothing"
    START = "start"
    STOP = "stop"
    REGISTER = "register"
    KILL = "kill"
    FORGET = "forget"
    CONFIRM = "confirm"
    RECLAIM = "reclaim"
    RELEASE = "release"
    TAKE = "take"


@dataclass(frozen=True)
class Local:
    """The VM as this node has it."""

    present: bool = False  # in the local catalog
    live: bool = False  # a QEMU of it runs here (running, paused, ...)
    busy: bool = False  # migrating, incoming, a disk job, an operation under way
    startable: bool = False  # off or crashed: a start is allowed


ABSENT = Local()


def decide(
    me: str,
    owner: Owner | None,
    want: Want,
    local: Local,
    *,
    alive: Collection[str],
    self_ok: bool,
) -> Action:
    """The one thing to do now about one VM (see the module docstring)."""
    if local.busy:
        return Action.NOTHING
    if owner is None:
        # Not owned by anyone (a role half written): it must not run here.
        return _not_mine(local)
    if owner.pending:
        return _pending(me, owner, local, alive=alive, self_ok=self_ok)
    if owner.node != me:
        return _not_mine(local)
    startable = not local.present or local.startable
    if want is Want.RUNNING and not local.live and self_ok and startable:
        return Action.START
    if want is Want.OFF and local.live:
        return Action.STOP
    if not local.present:
        return Action.REGISTER
    return Action.NOTHING


def _not_mine(local: Local) -> Action:
    if local.live:
        return Action.KILL
    if local.present:
        return Action.FORGET
    return Action.NOTHING


def _pending(me: str, owner: Owner, local: Local, *, alive: Collection[str],
             self_ok: bool) -> Action:  # fmt: skip
    if owner.node == me:
        if local.live:
            return Action.CONFIRM if self_ok else Action.NOTHING
        if owner.source not in alive and self_ok:
            return Action.TAKE
        return Action.NOTHING
    if owner.source == me:
        if not self_ok:
            return Action.KILL if local.live else Action.NOTHING
        return Action.RECLAIM if local.live else Action.RELEASE
    return _not_mine(local)
