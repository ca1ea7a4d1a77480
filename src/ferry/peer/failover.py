"""Peer payloads and routes of failover (a replica host calls a primary, or the other way).

Wire format. Every call needs a host certificate of the same CA, and the
answering host then authorises the caller *for that VM* (an admin
certificate may call them too)::

    GET  /v1/peer/vms/{uuid}                 -> VmState       split-brain guard
    GET  /v1/peer/vms/{uuid}?ask=primary     -> VmState       ... relayed to this host's primary
    POST /v1/peer/replications/{uuid}/yield  -> Yielded       the old primary gives the VM up
    POST /v1/peer/replicas/{uuid}/failover   -> FailedOver    planned: start there and reverse

Who may call what:

* ``GET /vms/{uuid}`` (does the VM run here?): only a partner of that VM on
  this host: its replica host (pinned thumbprint) when this host is the
  primary; its primary (pinned), its origin (by name) or the host it is
  extended to (pinned) when this host holds the replica. A host that does
  not know the VM at all answers 404, which the guard reads as "not here".
  ``ask=primary`` is how an extended replica learns about the VM's origin:
  it is answered only for the host this replica is extended to, by asking
  this host's own primary (which authorises this host as its replica);
* ``yield``: only the pinned replica host of this host's primary
  relationship; refused (409) while the VM runs here as well;
* ``failover`` (the last step of a planned failover, on the replica): only
  the pinned primary of that replica relationship. It answers once the VM
  runs on the replica and replication is reversed.

A refusal is 403 with one line and changes nothing. ``state`` is a VM state
(:class:`ferry.core.vmstate.VmState` values).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ferry.peer.routes import NoBody, Route


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class VmState(_Model):
    state: str
    host: str = ""  # the host whose VM this is (the relayed one for ask=primary)


class Yielded(_Model):
    vm: str
    yielded: bool


class FailedOver(_Model):
    """The replica's answer to a planned failover: the VM runs there now."""

    vm: str
    host: str
    point: int
    time: float
    start_s: float


ASK_PRIMARY = {"ask": "primary"}

VM_STATE = Route("GET", "/v1/peer/vms/{uuid}", NoBody, VmState)
YIELD = Route("POST", "/v1/peer/replications/{uuid}/yield", NoBody, Yielded)
PLANNED = Route("POST", "/v1/peer/replicas/{uuid}/failover", NoBody, FailedOver)
