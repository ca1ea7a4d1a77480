"""Peer payloads and routes of cluster membership (one node asks another).

Wire format (a host certificate; the answering node serves only the nodes of
its own cluster, by certificate name against ``members/`` in the store)::

    POST /v1/peer/clusters/{cluster}/probe  ProbeRequest -> ProbeReply

A probe is how ``cluster volume add`` proves every node sees one directory:
the node handling the add gives each node a token per node, then asks each
node in turn to ``write`` its own probe file into ``path``, to ``read`` every
node's probe file (``missing`` names the nodes whose file it did not find with
the right token), and finally to ``clean`` its own file up. The probe file of
node N for volume V is ``<path>/.ferry-probe-<V>-<N>``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from ferry.peer.routes import Route


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ProbeRequest(_Model):
    volume: str
    path: str
    action: Literal["write", "read", "clean"]
    tokens: dict[str, str]  # node -> the token its probe file holds


class ProbeReply(_Model):
    node: str
    missing: list[str] = []  # for "read": nodes whose probe file is absent or different


PROBE = Route("POST", "/v1/peer/clusters/{cluster}/probe", ProbeRequest, ProbeReply)
