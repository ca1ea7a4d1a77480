"""The disk phase of a shared-nothing move: the mirror's NBD target and job arguments.

A copy move mirrors each disk (``blockdev-mirror``, ``sync: full``) into the
destination QEMU's NBD export of it, over the same TLS channel as the memory
stream. What crosses the wire is only data: the mirror asks the source's
block status, so unallocated and zero clusters become ``NBD_CMD_WRITE_ZEROES``
commands (no payload), and the target node has ``detect-zeroes: unmap``, so
an allocated cluster that reads as zeroes is sent as such a command too.

QEMU's default mirror (granularity = the qcow2 cluster, 64 KiB; 16 MiB in
flight) copies the 1 GiB of the benchmark's disk over TLS in about 9.5 s;
with 64 MiB in flight it runs at about the speed of ``qemu-img convert``
onto the same NBD export (``bench/bench_disk_phase.py`` measures them in one
process): QEMU merges adjacent dirty granules into requests of up to
buf-size/16, so the larger buffer makes the requests larger without a
coarser granularity. The granularity stays the cluster's: a 1 MiB one was
tried and dropped, because it is also the unit the mirror re-copies when the
guest writes, and a guest writing a small record every 200 ms then dirtied
5 MiB/s, more than a 4 MiB/s ``--max-bandwidth`` cap could carry, so the
mirror never became ready (CI caught it in test_migration_refusals and
test_cluster_crossing). The limit of both is QEMU's NBD path
over one connection (about 170 MiB/s into a qcow2 here, 320 MiB/s into a
``null-co`` target, with less CPU time than wall time on both sides), not
TLS: plain TCP measured the same. ``buf-size`` is memory the source QEMU
holds for the job, 64 MiB per disk while it runs.
"""

from __future__ import annotations

from typing import Any

MiB = 1024**2
MIRROR_BUF_SIZE = 64 * MiB
NBD_OPEN_TIMEOUT_S = 10  # a healthy destination answers in milliseconds


def nbd_target(node: str, export: str, server: tuple[str, int], *,
               tls_id: str | None, tls_hostname: str) -> dict[str, Any]:  # fmt: skip
    """``blockdev-add`` arguments of the NBD node a mirror writes into."""
    host, port = server
    args: dict[str, Any] = {
        "driver": "nbd",
        "node-name": node,
        "server": {"type": "inet", "host": host, "port": str(port)},
        "export": export,
        # A block of zeroes goes as a write-zeroes command, not as data.
        "detect-zeroes": "unmap",
        "discard": "unmap",
        # QEMU 7.2 connects in a thread and runs the TLS handshake's wait on the
        # main GLib context, which blockdev-add holds: if the destination dies
        # mid-handshake, both wait on each other for ever (the guest frozen with
        # them). open-timeout arms a timer that ends the wait with an error.
        "open-timeout": NBD_OPEN_TIMEOUT_S,
    }
    if tls_id:
        args["tls-creds"] = tls_id
        args["tls-hostname"] = tls_hostname
    return args


def mirror_arguments(job_id: str, device: str, target: str, *, speed: int) -> dict[str, Any]:
    """``blockdev-mirror`` arguments: the whole disk, the cluster's granularity, 64 MiB in flight.

    ``speed`` (bytes/s, 0 for none) caps this one job.
    """
    args: dict[str, Any] = {
        "job-id": job_id,
        "device": device,
        "target": target,
        "sync": "full",
        "buf-size": MIRROR_BUF_SIZE,
    }
    if speed:
        args["speed"] = speed
    return args
