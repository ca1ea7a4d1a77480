"""The bandwidth probe between two agents, over the same mutual-TLS channel as their other calls.

``PUT /v1/peer/probe`` (a host certificate): the body is N bytes of
anything, read and dropped as they arrive; the reply says how many came and
how long the reading took. The caller times the whole upload itself: that is
the figure the planner uses (bytes per second from one host to the other).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ferry.peer.routes import Route, Upload

MAX_PROBE_BYTES = 256 * 1024**2


class ProbeReceived(BaseModel):
    model_config = ConfigDict(frozen=True)

    bytes: int
    seconds: float


PROBE = Route("PUT", "/v1/peer/probe", Upload, ProbeReceived)
