"""Copy Cluster Roles, the host side: every VM of one volume from C1 into C2.

Runs on any node of C1 (the CLI asks one); both clusters' records are in the
one etcd they share, so this node reads and writes C2's keys directly. The
rules are :mod:`ferry.core.cluster.copy_roles`; this module only gathers
what they need and does what they decide:

- ``--test`` builds the report and registers the stopped copies in C2: the
  copy record ``copy-roles/<volume>`` in C2's store, phase ``tested``, holding
  each VM (node, state). No role is written in C2 and nothing changes in C1,
  so no cluster's HA can start a second instance of a VM.
- ``--run`` asks each VM's owner to stop it (``want`` off: the owner's
  reconciler shuts it down cleanly), waits until every one is off, then runs
  **one transaction**: C1's roles deleted, C2's roles put (owner the node the
  report placed it on, ``want`` as it was), each ``vms/<uuid>/replication``
  record moved from C1 to C2 (not deleted), and the record ``ran``. C2's
  reconcilers register and start the VMs; ``downtime_s`` runs from the stop
  request to running in C2. From the record, C1 refuses to start them
  (:meth:`ferry.host.cluster.vms.ClusterVms.before_start`).
- ``--rollback`` does the same the other way, onto the C1 nodes and states the
  record kept; the record becomes ``rolled-back``.

When C1's and C2's volume ``V`` are the same directory nothing is copied
(shared storage). When they are not (copied storage), ``--test`` reports per
VM what its disks hold (``copy``), and ``--run`` asks each VM's owner
(:mod:`ferry.host.cluster.copy_disks`) for a full copy of its disks into
``<C2's V>/<uuid>/`` while the VMs run, then, for all at once, the stop and
a copy of only what changed since (a dirty bitmap started with the full
copy), then does the same transaction with the disks' new paths
(:func:`ferry.core.cluster.crossing.crossed_spec`); each row gets
``copied_bytes`` (``full``, ``final`` and their seconds) and ``downtime_s``
from the stop asked to running in C2. ``--rollback`` of a copied ``--run``
asks each VM's owner in C2 to stop it and copy only what it wrote in C2
(the persistent bitmap ``ferry-back`` the copies got at ``--run``) back onto
its disks in C1, which are as they were at ``--run``; then the transaction
back with C1's disk paths (rows get ``copied_bytes`` ``back``).

Replication carries over (:mod:`ferry.host.cluster.replication`): the old
owner hands it to C2 before it drops the VM, and after a clean stop the new
owner's next cycle is a delta of the bitmap.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferry.core.cluster.copy_roles import (
    CopyRecord,
    CopyVm,
    NodeFacts,
    Phase,
    Step,
    check_request,
    check_step,
    check_vms,
    downtime_s,
    pick,
    record_key,
    report,
    start_refusal,
)
from ferry.core.cluster.crossing import crossed_spec, role_ops
from ferry.core.cluster.keys import ROOT, ClusterKeys, cluster_names
from ferry.core.cluster.nodes import NodeState, NodeView, node_views
from ferry.core.cluster.records import ClusterMeta, VolumeRecord
from ferry.core.cluster.roles import Owner, VmRole, Want, encode_role
from ferry.core.cluster.store import ClusterStore, Compare, Delete, Entry, Op, Put
from ferry.core.cpu_models import CpuFacts
from ferry.core.network import apply_network_map
from ferry.errors import ConflictError, FerryError, MoveFailedError, NotFoundError
from ferry.host.cluster.copy_disks import allocated_bytes
from ferry.peer.cluster import CopyDisksReply, CopyDisksRequest

if TYPE_CHECKING:
    from ferry.host.cluster.membership import Membership
    from ferry.host.cluster.vms import ClusterVms

log = logging.getLogger(__name__)

STOP_WAIT_S = 180.0  # a clean stop (ACPI, then forced after the host's stop_timeout_s)
START_WAIT_S = 120.0  # the new owner's reconciler registers and starts it
_AT_REST = ("off", "crashed")
Copies = dict[str, dict[str, float]]  # VM name -> "full", "final" bytes and their seconds


class CopyRoles:
    """``cluster copy-roles`` on a node of the source cluster; see the module docstring."""

    def __init__(self, cluster_vms: ClusterVms) -> None:
        self.cvms = cluster_vms
        self._lock = asyncio.Lock()

    async def step(self, step: Step, *, source: str, target: str, volume: str,
                   network_map: Mapping[str, str]) -> dict[str, Any]:  # fmt: skip
        async with self._lock:
            return await self._step(step, source=source, target=target, volume=volume,
                                    network_map=network_map)  # fmt: skip

    async def _step(self, step: Step, *, source: str, target: str, volume: str,
                    network_map: Mapping[str, str]) -> dict[str, Any]:  # fmt: skip
        m = self.cvms.membership(source)
        store = m.store
        k1, k2 = m.keys, ClusterKeys(target)
        known = cluster_names([e.key for e in await store.range(ROOT) if e.key.endswith("/meta")])
        target_volumes = await _volumes(store, k2)
        check_request(source=source, target=target, volume=volume, known=known,
                      target_volumes=target_volumes)  # fmt: skip
        entry = await store.get(record_key(k2, volume))
        record = CopyRecord.from_json(entry.value) if entry is not None else None
        check_step(step, source=source, volume=volume, record=record)
        if step is Step.ROLLBACK:
            assert record is not None and entry is not None
            return await self._rollback(store, k1, k2, record, entry)
        own = (await _volumes(store, k1)).get(volume)
        if own is None:
            raise NotFoundError(f"cluster {source!r} has no volume {volume!r}")
        target_path = target_volumes[volume]
        # Not one directory: --run copies the disks into the target's (copy_disks.py).
        copied = Path(own).resolve() != Path(target_path).resolve()
        vms, roles = await self._vms(store, k1)
        chosen, note = pick(volume, vms)
        meta = await store.get(k2.meta)
        assert meta is not None  # check_request found it
        level = ClusterMeta.from_json(meta.value).functional_level
        check_vms(chosen, target=target, level=level)
        nodes = node_views(await store.range(k2.prefix), k2)
        facts, unanswered = await self._target_facts([n for n in nodes if n.state is NodeState.UP])
        shown = report(chosen, source=source, target=target, volume=volume, level=level,
                       nodes=nodes, network_map=network_map, facts=facts,
                       unanswered=unanswered, note=note)  # fmt: skip
        for row in shown["vms"]:
            spec = VmRole.model_validate_json(roles[row["uuid"]].value).spec
            disks = [d.path for d in spec.disks]
            row["copy"] = {"disks": len(disks), "bytes": await asyncio.to_thread(
                allocated_bytes, disks), "to": target_path} if copied else None  # fmt: skip
        shown["storage"] = "copied" if copied else "shared"
        if step is Step.TEST:
            tested = CopyRecord(source, target, volume, Phase.TESTED, time.time(), tuple(chosen),
                                copied)  # fmt: skip
            await _put_record(store, record_key(k2, volume), entry, tested)
            return {**shown, "step": step.value, "phase": tested.phase.value}
        if not shown["ok"]:
            bad = ", ".join(row["name"] for row in shown["vms"] if not row["ok"])
            raise ConflictError(
                f"the report refuses VM(s) {bad}: see 'ferry cluster copy-roles "
                f"--from {source} --to {target} --volume {volume} --test'"
            )
        assert entry is not None
        placed = {row["name"]: str(row["target_node"]) for row in shown["vms"]}
        moves = [(vm, roles[vm.uuid], placed[vm.name]) for vm in chosen]
        ran = CopyRecord(source, target, volume, Phase.RAN, time.time(), tuple(chosen), copied)
        copies: Copies = {}
        if copied:
            times, copies = await self._copy_over(m, k2, moves, entry, ran, network_map,
                                                  target_path)  # fmt: skip
        else:
            times = await self._hand_over(store, k1, k2, moves, entry, ran, network_map)
        for row in shown["vms"]:
            row["downtime_s"] = times.get(row["name"])
            row["copied_bytes"] = copies.get(row["name"])
            row["state"] = "running" if row["name"] in times else row["state"]
            row["node"], row["cluster"] = placed[row["name"]], target
        return {**shown, "step": step.value, "phase": ran.phase.value}

    async def _target_facts(
        self, nodes: Sequence[NodeView]
    ) -> tuple[dict[str, NodeFacts], dict[str, str]]:
        """Each up node of C2's CPU models and networks (its hello), all asked at once;
        and the nodes that did not answer, with why."""
        copier = self.cvms.disk_copies
        if copier is None:
            return {}, {n.name: "this node has no peer connector to ask it" for n in nodes}

        async def ask(node: NodeView) -> NodeFacts | str:
            assert copier is not None
            try:
                hello = await copier.hello(node.name, node.url)
            except FerryError as exc:
                return str(exc)
            said = None if hello.networks is None else frozenset(hello.networks)
            return NodeFacts(CpuFacts(host=node.name, models=hello.cpu_models), said)

        answers = await asyncio.gather(*(ask(n) for n in nodes))
        facts = {n.name: a for n, a in zip(nodes, answers, strict=True)
                 if isinstance(a, NodeFacts)}  # fmt: skip
        unanswered = {n.name: a for n, a in zip(nodes, answers, strict=True)
                      if isinstance(a, str)}  # fmt: skip
        return facts, unanswered

    async def _vms(
        self, store: ClusterStore, k1: ClusterKeys
    ) -> tuple[list[CopyVm], dict[str, Entry]]:
        """Every VM of C1 as the rules see it, and each one's config entry."""
        parts: dict[str, dict[str, Entry]] = {}
        for e in await store.range(k1.vms):
            parts.setdefault(ClusterKeys.vm_uuid_of(e.key), {})[ClusterKeys.last_part(e.key)] = e
        vms, configs = [], {}
        for uuid, got in parts.items():
            if "config" not in got:
                continue
            role = VmRole.model_validate_json(got["config"].value)
            owner = Owner.decode(got["owner"].value) if "owner" in got else None
            state = got["state"].value.decode() if "state" in got else "off"
            want = got["want"].value.decode() if "want" in got else Want.OFF.value
            if want == Want.RUNNING.value and state in ("starting", "off"):
                state = "running"  # its owner starts it, and publishes states a pass late
            spec = role.spec
            vms.append(CopyVm(
                name=spec.name, uuid=uuid, volume=role.volume, config_version=spec.config_version,
                memory=spec.memory, node=owner.node if owner else "", state=state,
                cpu_model=spec.cpu_model, networks=tuple(n.network for n in spec.nics),
                replica=_replica(got.get("replication")),
                migrating=bool(owner and owner.pending)))  # fmt: skip
            configs[uuid] = got["config"]
        return vms, configs

    async def _hand_over(self, store: ClusterStore, k1: ClusterKeys, k2: ClusterKeys,
                         moves: Sequence[tuple[CopyVm, Entry, str]], entry: Entry,
                         record: CopyRecord,
                         network_map: Mapping[str, str]) -> dict[str, float]:  # fmt: skip
        """Stop in the source, one transaction, start in the target; name -> downtime_s."""
        stopped_at = time.time()
        asked = 0
        for vm, _, _ in moves:
            asked = await store.put(k1.vm_want(vm.uuid), Want.OFF.value.encode())
        live = [vm for vm, _, _ in moves if vm.state not in _AT_REST]
        await _wait_states(store, k1, live, _AT_REST, STOP_WAIT_S, asked)
        started = await self._transfer(store, k1, k2, moves, entry, record, network_map, None)
        return {name: downtime_s(stopped_at, at) for name, at in started.items()}

    async def _copy_over(self, m: Membership, k2: ClusterKeys,
                         moves: Sequence[tuple[CopyVm, Entry, str]], entry: Entry,
                         record: CopyRecord, network_map: Mapping[str, str],
                         target_path: str) -> tuple[dict[str, float], Copies]:  # fmt: skip
        """Copied storage: a full copy of each VM's disks while they run, then each stopped
        and only its changes copied (on its owner, :mod:`ferry.host.cluster.copy_disks`),
        then the same transaction and start as for shared storage. name -> downtime_s, and
        name -> {"full", "final"} bytes."""
        copier = self.cvms.disk_copies
        if copier is None:
            raise MoveFailedError("this node cannot copy disks (no disk copier): nothing done")
        urls = {n.name: n.url for n in await m.nodes()}
        asks = []
        for vm, config, _ in moves:
            spec = VmRole.model_validate_json(config.value).spec
            crossed = crossed_spec(spec, target_path)
            files = {src: dst for src, dst in ((spec.kernel, crossed.kernel),
                     (spec.initrd, crossed.initrd)) if src and dst}  # fmt: skip
            asks.append((vm, CopyDisksRequest(vm_uuid=vm.uuid, phase="full",
                                              volume_path=target_path,
                                              targets=[d.path for d in crossed.disks],
                                              files=files)))  # fmt: skip

        async def phase(which: str) -> list[CopyDisksReply]:
            return list(await asyncio.gather(*(
                copier.ask(m, vm.node, urls.get(vm.node, ""),
                           body.model_copy(update={"phase": which}))
                for vm, body in asks)))  # fmt: skip

        try:
            full = await phase("full")
        except FerryError as exc:
            raise MoveFailedError(f"the full copy of volume {record.volume!r}'s disks into "
                                  f"cluster {record.target!r} failed: {exc}; nothing handed "
                                  "over, the VMs run on in the source") from exc  # fmt: skip
        try:
            final = await phase("final")
        except FerryError as exc:
            raise MoveFailedError(
                f"the final copy of volume {record.volume!r}'s changes failed: {exc}; nothing "
                "handed over (a VM whose copy ended is stopped: start it again in the source)"
            ) from exc
        started = await self._transfer(m.store, m.keys, k2, moves, entry, record, network_map,
                                       target_path)  # fmt: skip
        times: dict[str, float] = {}
        copies: Copies = {}
        for (vm, _), done, last in zip(asks, full, final, strict=True):
            copies[vm.name] = {"full": done.bytes, "final": last.bytes,
                               "full_s": done.seconds, "final_s": last.seconds}  # fmt: skip
            if vm.name in started and last.stopped_at is not None:
                times[vm.name] = downtime_s(last.stopped_at, started[vm.name])
        return times, copies

    async def _transfer(self, store: ClusterStore, k1: ClusterKeys, k2: ClusterKeys,
                        moves: Sequence[tuple[CopyVm, Entry, str]], entry: Entry,
                        record: CopyRecord, network_map: Mapping[str, str],
                        target_path: str | None) -> dict[str, float]:  # fmt: skip
        """The one transaction (the VMs stopped), then wait for them running in the target;
        name -> when seen running. ``target_path``: their disks were copied there."""
        compares = [Compare.unchanged(entry.key, entry.mod_revision)]
        ops: list[Op] = [Put(entry.key, record.to_json())]
        for vm, config, node in moves:
            role = VmRole.model_validate_json(config.value)
            spec = apply_network_map(role.spec, network_map)
            if target_path is not None:
                spec = crossed_spec(spec, target_path)
            compares += [
                Compare.unchanged(config.key, config.mod_revision),
                Compare.absent(k2.vm_config(vm.uuid)),
                Compare.absent(k2.name(vm.name)),
            ]
            want = Want.RUNNING if vm.state == "running" else Want.OFF
            ops += await _move_role(store, k1, k2, vm, encode_role(role.model_copy(
                update={"spec": spec})), node, want)  # fmt: skip
        result = await store.txn(compares, ops)
        if not result.succeeded:
            raise MoveFailedError(f"the VMs of volume {record.volume!r} changed in cluster "
                                  f"{record.source!r} meanwhile: nothing handed over (they are "
                                  "stopped; start them again in the source)")  # fmt: skip
        log.info("copy-roles: volume %s's %d VM(s) owned by cluster %s from revision %d",
                 record.volume, len(moves), record.target, result.revision)  # fmt: skip
        running = [vm for vm, _, _ in moves if vm.state == "running"]
        return await _wait_states(store, k2, running, ("running",), START_WAIT_S, result.revision)

    async def _rollback(self, store: ClusterStore, k1: ClusterKeys, k2: ClusterKeys,
                        record: CopyRecord, entry: Entry) -> dict[str, Any]:  # fmt: skip
        """The VMs back to C1, on their old nodes and in their old states; copied storage:
        what they wrote in C2 copied back onto C1's disks first."""
        stopped_at = time.time()
        stops: dict[str, tuple[float, dict[str, float]]] = {}
        back_to: str | None = None
        if record.copied:
            back_to = (await _volumes(store, k1)).get(record.volume)
            if back_to is None:
                raise NotFoundError(f"cluster {record.source!r} has no volume "
                                    f"{record.volume!r} any more: nothing rolled back")  # fmt: skip
            stops = await self._copy_back(store, k2, record, back_to)
        else:
            asked = 0
            for vm in record.vms:
                asked = await store.put(k2.vm_want(vm.uuid), Want.OFF.value.encode())
            live = [vm for vm in record.vms if vm.state == "running"]  # started in C2 by --run
            await _wait_states(store, k2, live, _AT_REST, STOP_WAIT_S, asked)
        back = CopyRecord(record.source, record.target, record.volume, Phase.ROLLED_BACK,
                          time.time(), record.vms, record.copied)  # fmt: skip
        compares = [Compare.unchanged(entry.key, entry.mod_revision)]
        ops: list[Op] = [Put(entry.key, back.to_json())]
        for vm in record.vms:
            config = await store.get(k2.vm_config(vm.uuid))
            if config is None:
                raise NotFoundError(
                    f"VM {vm.name!r} has no config in cluster "
                    f"{record.target!r}: deleted there? nothing rolled back"
                )
            compares += [
                Compare.unchanged(config.key, config.mod_revision),
                Compare.absent(k1.vm_config(vm.uuid)),
                Compare.absent(k1.name(vm.name)),
            ]
            want = Want.RUNNING if vm.state == "running" else Want.OFF
            value = config.value
            if back_to is not None:  # its disks are C1's again
                role = VmRole.model_validate_json(value)
                value = encode_role(role.model_copy(update={
                    "spec": crossed_spec(role.spec, back_to)}))  # fmt: skip
            ops += await _move_role(store, k2, k1, vm, value, vm.node, want)
        result = await store.txn(compares, ops)
        if not result.succeeded:
            raise MoveFailedError(
                f"the VMs of volume {record.volume!r} changed in cluster "
                f"{record.target!r} meanwhile: nothing rolled back"
            )
        running = [vm for vm in record.vms if vm.state == "running"]
        started = await _wait_states(
            store, k1, running, ("running",), START_WAIT_S, result.revision
        )
        rows = [{"name": vm.name, "uuid": vm.uuid, "node": vm.node, "cluster": record.source,
                 "state": "running" if vm.name in started else vm.state,
                 "downtime_s": downtime_s(stops.get(vm.name, (stopped_at, {}))[0],
                                          started[vm.name]) if vm.name in started else None,
                 "copied_bytes": stops[vm.name][1] if vm.name in stops else None}
                for vm in record.vms]  # fmt: skip
        return {"from": record.source, "to": record.target, "volume": record.volume,
                "step": Step.ROLLBACK.value, "phase": back.phase.value, "ok": True,
                "vms": rows}  # fmt: skip

    async def _copy_back(self, store: ClusterStore, k2: ClusterKeys, record: CopyRecord,
                         back_to: str) -> dict[str, tuple[float, dict[str, float]]]:  # fmt: skip
        """Each VM's owner in C2 stops it and copies what it wrote there since ``--run`` onto
        its disks in C1 (as they were at ``--run``); name -> (when its stop was asked, the
        bytes copied back and their seconds)."""
        copier = self.cvms.disk_copies
        if copier is None:
            raise MoveFailedError("this node cannot copy disks (no disk copier): nothing done")
        m = self.cvms.membership(record.source)
        urls = {n.name: n.url for n in node_views(await store.range(k2.prefix), k2)}
        asks = []
        for vm in record.vms:
            config, owner = (await store.get(k2.vm_config(vm.uuid)),
                             await store.get(k2.vm_owner(vm.uuid)))  # fmt: skip
            if config is None or owner is None:
                raise NotFoundError(f"VM {vm.name!r} has no role in cluster {record.target!r}: "
                                    "deleted there? nothing rolled back")  # fmt: skip
            spec = crossed_spec(VmRole.model_validate_json(config.value).spec, back_to)
            node = Owner.decode(owner.value).node
            body = CopyDisksRequest(
                vm_uuid=vm.uuid,
                phase="back",
                volume_path=back_to,
                targets=[d.path for d in spec.disks],
                volume=record.volume,
            )
            asks.append(copier.ask(m, node, urls.get(node, ""), body, cluster=record.target))
        try:
            replies = await asyncio.gather(*asks)
        except FerryError as exc:
            raise MoveFailedError(
                f"copying volume {record.volume!r}'s changes back to cluster {record.source!r} "
                f"failed: {exc}; nothing rolled back (a VM whose copy ended is off in "
                f"{record.target!r}: start it there again)"
            ) from exc
        return {vm.name: (r.stopped_at or time.time(), {"back": r.bytes, "back_s": r.seconds})
                for vm, r in zip(record.vms, replies, strict=True)}  # fmt: skip


async def _volumes(store: ClusterStore, keys: ClusterKeys) -> dict[str, str]:
    records = [VolumeRecord.from_json(e.value) for e in await store.range(keys.volumes)]
    return {r.name: r.path for r in records}


async def _put_record(
    store: ClusterStore, key: str, entry: Entry | None, record: CopyRecord
) -> None:
    held = Compare.absent(key) if entry is None else Compare.unchanged(key, entry.mod_revision)
    if not (await store.txn([held], [Put(key, record.to_json())])).succeeded:
        raise ConflictError(f"another copy-roles of volume {record.volume!r} ran meanwhile; "
                            "try again")  # fmt: skip


async def _move_role(store: ClusterStore, src: ClusterKeys, dst: ClusterKeys, vm: CopyVm,
                     config: bytes, node: str, want: Want) -> list[Op]:  # fmt: skip
    """The ops that delete VM ``vm``'s role in ``src`` and put it in ``dst`` with owner
    ``node``; its replication record moves with it (the new owner adopts it)."""
    uuid = vm.uuid
    ops = [*role_ops(src, uuid, vm.name, None),
           *role_ops(dst, uuid, vm.name, (config, node, want.value.encode())),
           Put(src.vm_left(uuid), b"1"), Delete(dst.vm_left(uuid))]  # fmt: skip
    replication = await store.get(src.vm_replication(uuid))
    if replication is not None:  # deleted in src by role_ops; put in dst as it was
        ops.append(Put(dst.vm_replication(uuid), replication.value))
    return ops


async def _wait_states(store: ClusterStore, keys: ClusterKeys, vms: Sequence[CopyVm],
                       wanted: tuple[str, ...], timeout: float,
                       after: int) -> dict[str, float]:  # fmt: skip
    """Poll each VM's published state in ``keys``' cluster until its owner published one
    of ``wanted`` after revision ``after`` (an older one may be stale); name -> when it
    was first seen so."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(vms):
        for vm in vms:
            if vm.name in seen:
                continue
            state = await store.get(keys.vm_state(vm.uuid))
            if state is not None and state.mod_revision > after and (
                    state.value.decode() in wanted):  # fmt: skip
                seen[vm.name] = time.time()
        if len(seen) == len(vms):
            break
        if time.monotonic() >= deadline:
            late = ", ".join(vm.name for vm in vms if vm.name not in seen)
            raise MoveFailedError(f"VM(s) {late} not {' or '.join(wanted)} after {timeout:.0f} "
                                  "s: see 'ferry cluster events'")  # fmt: skip
        await asyncio.sleep(0.2)
    return seen


def _replica(entry: Entry | None) -> str | None:
    if entry is None:
        return None
    try:
        data = json.loads(entry.value)
    except ValueError:
        return "yes"
    found = data.get("replica") if isinstance(data, dict) else None
    return str(found) if found else "yes"


async def copy_refusal(
    store: ClusterStore, cluster: str, name: str, uuid: str | None
) -> str | None:
    """Why ``cluster`` may not start VM ``name``: a ``--run`` gave it to another cluster."""
    records = [CopyRecord.from_json(e.value) for e in await store.range(ROOT)
               if "/copy-roles/" in e.key]  # fmt: skip
    for record in records:
        for vm in record.vms:
            if vm.name == name or vm.uuid == uuid:
                why = start_refusal(name, vm.uuid, cluster, [record])
                if why is not None:
                    return why
    return None
