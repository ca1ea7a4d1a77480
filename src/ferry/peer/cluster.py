"""Peer payloads and routes of cluster membership (one node asks another).

Wire format (a host certificate; the answering node serves only the nodes of
its own cluster, by certificate name against ``members/`` in the store)::

    POST /v1/peer/clusters/{cluster}/probe  ProbeRequest -> ProbeReply
    POST /v1/peer/clusters/{cluster}/copy-disks  CopyDisksRequest -> CopyDisksReply

A probe is how ``cluster volume add`` proves every node sees one directory:
the node handling the add gives each node a token per node, then asks each
node in turn to ``write`` its own probe file into ``path``, to ``read`` every
node's probe file (``missing`` names the nodes whose file it did not find with
the right token), and finally to ``clean`` its own file up. The probe file of
node N for volume V is ``<path>/.ferry-probe-<V>-<N>``.

A disk copy is how ``cluster copy-roles`` moves a VM's disks into another
cluster's volume directory: asked of the VM's owner, see
:class:`CopyDisksRequest` (:mod:`ferry.host.cluster.copy_disks`).
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


class CopyDisksRequest(_Model):
    """``cluster copy-roles --run`` with copied storage, asked of a VM's owner in the source.

    ``full``: copy each disk of the running VM into ``targets`` (one per disk, new
    qcow2 files in the target cluster's volume at ``volume_path``) and start the
    bitmap ``ferry-copy`` at that instant; copy ``files`` (kernel, initrd: source
    -> target). ``final``: want off, the VM stopped, only the clusters the bitmap
    marks copied into the same targets, QEMU ended, and a persistent bitmap
    ``ferry-back`` added to the targets (it records what the VM writes in the
    target cluster). An off VM is copied whole by ``full`` and has nothing for
    ``final``. ``back`` (``--rollback``, asked of the VM's owner in the target
    cluster by a node of the source): like ``final`` with ``ferry-back``, into
    the source's disks (``targets``), which are as they were at ``--run``.
    """

    vm_uuid: str
    phase: Literal["full", "final", "back"]
    volume_path: str
    targets: list[str]
    files: dict[str, str] = {}
    volume: str = ""  # ``back``: the volume whose copy record names the asker's cluster


class CopyDisksReply(_Model):
    node: str
    bytes: int  # copied by this phase (a full copy: each disk's size as QEMU copied it)
    seconds: float
    stopped_at: float | None = None  # ``final``: when its stop was asked (epoch)


COPY_DISKS = Route("POST", "/v1/peer/clusters/{cluster}/copy-disks", CopyDisksRequest,
                   CopyDisksReply)  # fmt: skip
