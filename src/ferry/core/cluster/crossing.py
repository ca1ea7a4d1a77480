"""Moving a VM from one cluster into another: the rules, pure.

A *crossing* is a live move of a clustered VM from cluster C1 into cluster C2
(``vm move VM --to-cluster C2``). Everything here is decided before anything
starts, from records both clusters keep in their store, and each refusal is
one line that names the remedy:

- the target is a cluster other than the VM's own, and it exists;
- it has the volume asked for (by default the one of the VM's own volume name,
  else its only volume), and no VM of the same name;
- its functional level runs the VM's configuration version (*the version
  rule*): a VM never lands in a cluster where some node could not run it;
- a replica cluster (a replica broker) is at the primary's level or newer.

The VM's files in C2 live in ``<volume path>/<uuid>/`` as for a VM created
there (:func:`crossed_spec`), so every node of C2 can restart it.
:func:`unprotected_s` is the measure of the hand-over: the time between C1
releasing the VM and C2 taking it, read from the store's revisions and the
records' times (zero when one transaction did both).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ferry.core.cluster.keys import ClusterKeys
from ferry.core.cluster.roles import Owner
from ferry.core.cluster.store import Delete, Op, Put
from ferry.core.spec import VmSpec
from ferry.errors import ConflictError, InvalidInputError, NotFoundError, VersionError


def check_target(vm: str, *, source: str, target: str, known: list[str]) -> None:
    """``--to-cluster TARGET`` names another cluster that exists."""
    if target == source:
        raise InvalidInputError(
            f"VM {vm!r} is in cluster {source!r} already: --to-cluster moves it into another "
            f"cluster; 'ferry vm move {vm} --to NODE' moves it between {source}'s nodes"
        )
    if target not in known:
        listed = ", ".join(sorted(known)) or "none"
        raise NotFoundError(f"unknown cluster {target!r} (clusters in this etcd: {listed})")


def choose_volume(target: str, asked: str | None, own: str, volumes: Mapping[str, str]) -> str:
    """The volume of ``target`` the VM's disks go on (``--volume``, else its own volume's
    name if ``target`` has one, else ``target``'s only volume)."""
    listed = ", ".join(sorted(volumes)) or "none"
    if asked is not None:
        if asked not in volumes:
            raise NotFoundError(f"cluster {target!r} has no volume {asked!r} (volumes: {listed})")
        return asked
    if own in volumes:
        return own
    if len(volumes) == 1:
        return next(iter(volumes))
    if not volumes:
        raise NotFoundError(f"cluster {target!r} has no volume: add one with "
                            f"'ferry cluster volume add NAME PATH --cluster {target}'")  # fmt: skip
    raise InvalidInputError(f"cluster {target!r} has no volume {own!r}: pick one with "
                            f"--volume (volumes: {listed})")  # fmt: skip


def check_level(vm: str, config_version: int, target: str, level: int) -> None:
    """The version rule: a cluster takes only VMs its functional level runs."""
    if config_version > level:
        raise VersionError(
            f"cluster {target!r} is at functional level {level}, below VM {vm!r}'s "
            f"configuration version {config_version}: raise it with 'ferry cluster "
            f"upgrade-level {target}' once its nodes run level {config_version}, or pick a "
            f"cluster at level {config_version} or newer"
        )


def check_replica_level(vm: str, primary: str, primary_level: int, replica: str,
                        replica_level: int) -> None:  # fmt: skip
    """A replica cluster is at the primary's level or newer (its failover must run there)."""
    if replica_level < primary_level:
        raise VersionError(
            f"replica cluster {replica!r} is at functional level {replica_level}, below "
            f"{primary}'s level {primary_level}: VM {vm!r} could not fail over there; raise it "
            f"with 'ferry cluster upgrade-level {replica}' first"
        )


def check_name_free(vm: str, target: str, names: Mapping[str, str], uuid: str) -> None:
    """No other VM of ``target`` has the name (or the uuid)."""
    if vm in names or uuid in names.values():
        raise ConflictError(f"cluster {target!r} already has a VM named {vm!r}: rename or "
                            "remove one of them first")  # fmt: skip


def crossed_spec(spec: VmSpec, volume_path: str) -> VmSpec:
    """The VM as cluster C2 keeps it: its disks and boot files in ``<volume>/<uuid>/``."""
    own = Path(volume_path) / spec.uuid
    disks = tuple(d.model_copy(update={"path": str(own / f"disk{i}.qcow2"), "format": "qcow2"})
                  for i, d in enumerate(spec.disks))  # fmt: skip
    return spec.model_copy(update={
        "disks": disks,
        "kernel": str(own / "kernel") if spec.kernel else None,
        "initrd": str(own / "initrd") if spec.initrd else None,
    })  # fmt: skip


def unprotected_s(*, released_revision: int, taken_revision: int, released_at: float,
                  taken_at: float) -> float:  # fmt: skip
    """The time no cluster owned the VM: 0 when one revision released and took it (one
    transaction), else the time between the two records (never negative)."""
    if taken_revision <= released_revision:
        return 0.0
    return round(max(0.0, taken_at - released_at), 3)


def role_ops(keys: ClusterKeys, uuid: str, name: str,
              put: tuple[bytes, str, bytes] | None) -> list[Op]:  # fmt: skip
    """Delete the VM's role in ``keys``' cluster, or (``put`` = config, owner node, want)
    write it there."""
    if put is None:
        return [Delete(keys.vm_config(uuid)), Delete(keys.vm_owner(uuid)),
                Delete(keys.vm_want(uuid)), Delete(keys.vm_state(uuid)),
                Delete(keys.vm_replication(uuid)), Delete(keys.name(name))]  # fmt: skip
    config, node, want = put
    return [Put(keys.vm_config(uuid), config), Put(keys.vm_owner(uuid),
            Owner.settled(node).encode()), Put(keys.vm_want(uuid), want),
            Put(keys.name(name), uuid.encode())]  # fmt: skip
