"""The per-node reconciler: makes what runs here match what the cluster's store says.

One pass reads every VM role of the cluster (``vms/``) and the alive
records, and for each clustered VM, local or owned here, applies the one
action :func:`ferry.core.cluster.reconcile.decide` returns (its docstring
holds the rules). A pass runs when the store reports a change under ``vms/``
or ``volumes/`` (one watch of the cluster's prefix, the alive refreshes
ignored) and at least every :data:`PASS_EVERY_S`, which catches what the
watch cannot see (a lease that expired, a QEMU that died here); a store that
does not answer skips the pass (nothing is started without it). A VM whose
start failed is left alone for :data:`START_BACKOFF_S`; one that ran here and
is now off with nobody having asked (its guest powered off) gets ``want =
off`` instead of a restart (a QEMU that crashed is restarted). A VM that runs
here while its ``want`` turned ``off`` (``vm stop`` asked on a node that does
not own it) is stopped cleanly, in a task of its own (ACPI, forced after the
host's ``stop_timeout_s``). After each pass the node puts the state of every
VM it owns, when it changed, into ``vms/<uuid>/state``: what the other nodes
show. Each pass reads the whole ``vms/`` prefix: with 1000 roles that is
about 4000 keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ferry.adapters.catalog import VmRecord
from ferry.core import vmstate
from ferry.core.cluster.keys import ROOT, ClusterKeys, cluster_names
from ferry.core.cluster.nodes import still_fenced
from ferry.core.cluster.reconcile import Action, Local, decide
from ferry.core.cluster.roles import Owner, VmRole, Want, decode_role, decode_want
from ferry.core.cluster.store import Compare, Entry, Put
from ferry.core.migration import IncomingState, Phase, is_final
from ferry.core.tasks import cancel_and_wait
from ferry.core.vmstate import VmState
from ferry.errors import FerryError
from ferry.host.cluster.membership import Membership
from ferry.host.cluster.vms import ClusterVms
from ferry.host.jobs import JobRegistry
from ferry.host.migration.service import MOVE, MigrationService

log = logging.getLogger(__name__)

PASS_EVERY_S = 10.0  # a fallback: changes under vms/ wake a pass at once (watch)
ARRIVING_EVERY_S = 1.0  # while a VM owned here still arrives by a move (see _rescue)
START_BACKOFF_S = 15.0
_BUSY_STATES = frozenset({VmState.MIGRATING, VmState.STARTING, VmState.STOPPING})
_AT_REST = frozenset({VmState.OFF, VmState.CRASHED})


@dataclass
class RoleEntries:
    """The store's records of one clustered VM."""

    config: Entry | None = None
    owner: Entry | None = None
    want: Entry | None = None
    state: Entry | None = None
    left: Entry | None = None  # copy-roles gave it to another cluster


class Reconciler:
    """Runs passes for the node's membership; see the module docstring."""

    def __init__(self, cluster_vms: ClusterVms, migrations: MigrationService,
                 jobs: JobRegistry) -> None:  # fmt: skip
        self.cvms = cluster_vms
        self.vms = cluster_vms.vms
        self.migrations = migrations
        self.jobs = jobs
        self.node = cluster_vms.node
        self._failed: dict[str, float] = {}  # uuid -> when its start failed
        self._live: set[str] = set()  # clustered VMs seen live here at the last pass
        # uuid -> the want's revision when this node first saw the VM live: only a
        # later "off" stops it (see ferry.core.cluster.reconcile)
        self._live_want: dict[str, int] = {}
        self._stopping: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._arriving = False  # a VM owned here still arrived by a move at the last pass
        self._pass_lock = asyncio.Lock()
        # Hook point (helper R, replication): called with the VM's uuid after this
        # node registered and started a VM it owns, e.g. after a node loss; the
        # VM's replication resumes here (host/cluster/replication.py on_owned).
        # A hook's failure is logged and changes nothing here.
        self.on_started: list[Callable[[str], Awaitable[None]]] = []
        # Called with the VM's uuid before this node drops a VM copy-roles gave to
        # another cluster (host/cluster/replication.py on_left hands its replication over).
        self.on_left: list[Callable[[str], Awaitable[None]]] = []

    # -- life ------------------------------------------------------------------------

    def start(self, m: Membership) -> None:
        self._tasks = [
            asyncio.create_task(self._loop(m), name=f"reconcile-{m.cluster}"),
            asyncio.create_task(self._watch(m), name=f"reconcile-watch-{m.cluster}"),
        ]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        stopping, self._stopping = list(self._stopping.values()), {}
        await cancel_and_wait(*tasks, *stopping)

    async def on_membership(self, m: Membership | None) -> None:
        """The cluster context's listener: a join starts passes, a leave stops them."""
        await self.stop()
        if m is not None:
            self.start(m)

    async def _loop(self, m: Membership) -> None:
        while True:
            try:
                await self.pass_once(m)
            except FerryError as exc:
                log.warning("reconcile pass of %s skipped: %s", m.cluster, exc)
            except Exception:  # a bug must not end the loop that keeps VMs where they belong
                log.exception("reconcile pass of %s failed", m.cluster)
            with contextlib.suppress(TimeoutError):
                # A VM waiting here between a move's hand-over and its resume is looked
                # at again soon: if its source is lost, its lease's end is the signal.
                async with asyncio.timeout(ARRIVING_EVERY_S if self._arriving else PASS_EVERY_S):
                    await self._wake.wait()
            self._wake.clear()

    async def _watch(self, m: Membership) -> None:
        """Wake a pass on a change of a VM role or a volume (not the alive refreshes)."""
        wanted = (m.keys.vms, m.keys.volumes)
        while True:
            try:
                async for event in m.store.watch(m.keys.prefix):
                    if event.entry.key.startswith(wanted):
                        self._wake.set()
            except FerryError as exc:
                log.debug("watch of %s ended: %s", m.keys.vms, exc)
            await asyncio.sleep(PASS_EVERY_S)

    # -- one pass --------------------------------------------------------------------

    async def pass_once(self, m: Membership) -> list[tuple[str, Action]]:
        """One look at every clustered VM; returns what was done (not NOTHING)."""
        async with self._pass_lock:
            return await self._pass(m)

    async def _pass(self, m: Membership) -> list[tuple[str, Action]]:
        roles: dict[str, RoleEntries] = {}
        for entry in await m.store.range(m.keys.vms):
            part = entry.key.rsplit("/", 1)[-1]
            if part in ("config", "owner", "want", "state", "left"):
                setattr(roles.setdefault(m.keys.vm_uuid_of(entry.key), RoleEntries()), part, entry)
        alive_entries = {m.keys.last_part(e.key): e
                         for e in await m.store.range(m.keys.alive_prefix)}  # fmt: skip
        alive = set(alive_entries)
        # Fenced until it rejoined (the rule of core/cluster/nodes.py): a node back
        # with a new lease starts what it still owns (after an etcd outage that
        # fenced every node, nobody else could have taken it over).
        mark = await m.store.get(m.keys.fenced(self.node))
        fenced = still_fenced(mark, alive_entries.get(self.node))
        self_ok = self.node in alive and not fenced and self.cvms.lease_ok()
        await self.cvms.volumes(m)
        local = {record.uuid: record for record in self.vms.list()}
        done: list[tuple[str, Action]] = []
        self._arriving = False
        for uuid in sorted(set(roles) | set(self.cvms.clustered)):
            entries = roles.get(uuid)
            if entries is not None and entries.config is None and entries.left is not None:
                record = local.get(uuid)
                if record is not None and not self._local(record).live:
                    for gone in list(self.on_left):  # its replication first, from here
                        try:
                            await gone(uuid)
                        except Exception:  # the hook's pass retries; the VM is not ours
                            log.exception("a hook before dropping VM %s failed", record.name)
                    await self.cvms.let_go(record)  # in another cluster now: not ours
                continue
            if entries is None or entries.config is None:
                self.cvms.mark(uuid, None)  # removed from the cluster: a plain VM now
                continue
            owner = Owner.decode(entries.owner.value) if entries.owner else None
            want = decode_want(entries.want.value if entries.want else None)
            if owner is not None and owner.node == self.node and uuid in local:
                self.cvms.mark(uuid, m.cluster)  # arrived by a move, or owned again
                if not owner.pending:  # vm upgrade-version ran here
                    await self.cvms.sync_version(m, local[uuid], entries.config)
            arriving = owner is not None and owner.node == self.node and (
                self.migrations.is_incoming(uuid))  # fmt: skip
            if arriving and owner is not None:
                if await self._rescue(m, uuid, owner, entries, alive=alive, self_ok=self_ok):
                    done.append((uuid, Action.TAKE))
                    continue
                self._arriving = True
            here = self._local(local.get(uuid))
            want_revision = entries.want.mod_revision if entries.want else 0
            if here.live:
                seen_with = self._live_want.setdefault(uuid, want_revision)
            else:
                seen_with = self._live_want.pop(uuid, want_revision)
            action = decide(self.node, owner, want, here, alive=alive, self_ok=self_ok)
            if action is Action.STOP and want_revision <= seen_with:
                continue  # off already when it started here: not this node's to stop
            if action is Action.START and time.monotonic() - self._failed.get(uuid, -1e9) < (
                START_BACKOFF_S
            ):
                continue
            record = local.get(uuid)
            if (
                action is Action.START
                and record is not None
                and uuid in self._live
                and (record.state is VmState.OFF)
            ):
                await self._powered_off(m, uuid, entries)
                continue
            if action is not Action.NOTHING:
                try:
                    await self._apply(m, action, uuid, entries, owner, local.get(uuid))
                except FerryError as exc:
                    log.warning("reconcile %s of VM %s: %s", action.value, uuid, exc)
                    if action is Action.START:
                        self._failed[uuid] = time.monotonic()
                        await self._event(m, "vm-start-failed", uuid, entries, str(exc))
                    continue
                done.append((uuid, action))
        self._live = {uuid for uuid, record in local.items()
                      if uuid in self.cvms.clustered and vmstate.is_live(record.state)
                      and uuid not in self._stopping}  # fmt: skip
        await self._publish_states(m, roles)
        return done

    async def _publish_states(self, m: Membership, roles: dict[str, RoleEntries]) -> None:
        """The state of each VM owned here, for the other nodes' ``vm show``; put only
        while the owner is unchanged (a VM removed meanwhile leaves no key behind)."""
        for record in self.vms.list():
            entries = roles.get(record.uuid)
            if entries is None or entries.config is None or entries.owner is None:
                continue
            owner = Owner.decode(entries.owner.value)
            state = record.state.value.encode()
            if (
                owner.node != self.node
                or owner.pending
                or (entries.state is not None and entries.state.value == state)
            ):
                continue
            with contextlib.suppress(FerryError):
                await m.store.txn(
                    [Compare.unchanged(entries.owner.key, entries.owner.mod_revision)],
                    [Put(m.keys.vm_state(record.uuid), state)],
                )

    async def _powered_off(self, m: Membership, uuid: str, entries: RoleEntries) -> None:
        """Its guest shut down (the agent asked nothing): it stays off, as asked from inside."""
        await m.store.put(m.keys.vm_want(uuid), Want.OFF.value.encode())
        log.info("clustered VM %s powered off from inside: want off", uuid)
        await self._event(m, "vm-stopped", uuid, entries, "its guest powered off")

    def _local(self, record: VmRecord | None) -> Local:
        if record is None:
            return Local()
        uuid = record.uuid
        busy = (
            record.state in _BUSY_STATES
            or self.migrations.is_incoming(uuid)
            or self.vms.turns.holder(uuid) is not None
            or self.vms.lock(uuid).locked()
            or uuid in self._stopping
            or any(
                job.kind == MOVE and job.vm_uuid == uuid and not is_final(Phase(job.state))
                for job in self.jobs.all()
            )
        )
        return Local(present=True, live=vmstate.is_live(record.state), busy=busy,
                     startable=record.state in _AT_REST)  # fmt: skip

    # -- actions ---------------------------------------------------------------------

    async def _apply(self, m: Membership, action: Action, uuid: str, entries: RoleEntries,
                     owner: Owner | None, record: VmRecord | None) -> None:  # fmt: skip
        assert entries.config is not None
        role = decode_role(entries.config.value, key=entries.config.key)
        if action in (Action.REGISTER, Action.START):
            record = self._register(m, role) if record is None else record
            if action is Action.START:
                # Read the owner again right before the start: the pass's read may be a
                # moment old (what is left between is the lease's to cover: fencing).
                now, _ = await self.cvms.owner_entry(m, uuid)
                if now is None or now.node != self.node or now.pending or not self.cvms.lease_ok():
                    log.info("VM %s changed owner since the pass began; not started", uuid)
                    return
                started = await self.vms.start(record.name)
                await self.cvms.after_start(started)
                self._failed.pop(uuid, None)
                self._live_want[uuid] = entries.want.mod_revision if entries.want else 0
                log.info("started clustered VM %s (owner %s, want running)", record.name,
                         self.node)  # fmt: skip
                await self._event(m, "vm-started", uuid, entries,
                                  f"owned by {self.node} and wanted running")  # fmt: skip
                for hook in list(self.on_started):
                    try:
                        await hook(uuid)
                    except Exception:  # not the reconciler's failure: the VM runs
                        log.exception("a hook after the start of VM %s failed", record.name)
        elif action is Action.STOP and record is not None:
            task = asyncio.create_task(self._stop(m, uuid, entries, record.name),
                                       name=f"reconcile-stop-{record.name}")  # fmt: skip
            self._stopping[uuid] = task
        elif action is Action.KILL and record is not None:
            held = owner.node if owner else "nobody"
            await self.vms.kill(record.name)
            await self.cvms.let_go(record)
            log.warning("killed clustered VM %s: node %s owns it, not %s", record.name, held,
                        self.node)  # fmt: skip
            await self._event(m, "vm-killed", uuid, entries, f"owned by {held}, not {self.node}")
        elif action is Action.FORGET and record is not None:
            await self.cvms.let_go(record)
        elif owner is not None and entries.owner is not None:
            await self._settle(m, action, owner, entries.owner)
            if action in (Action.CONFIRM, Action.RECLAIM) and record is not None:
                self.cvms.mark(uuid, m.cluster)

    async def _rescue(self, m: Membership, uuid: str, owner: Owner, entries: RoleEntries, *,
                      alive: set[str], self_ok: bool) -> bool:  # fmt: skip
        """A VM still arriving here by a live move that the store gives to this node (a
        move in this cluster pending to it, or one from another cluster handed over),
        whose source node is lost (its lease gone, so its QEMUs are fenced): nobody else
        will resume it. Take the owner by compare-and-swap (the source's take-back then
        fails), then resume it here as the source's finish would. True if it acted."""
        destination = self.migrations.destination
        job = destination.receiving(uuid)
        if not self_ok or entries.owner is None or job is None:
            return False
        source = str(job.detail.get("source", ""))
        if not await self._source_lost(m, owner, source, alive):
            return False
        result = await m.store.txn(
            [Compare.unchanged(entries.owner.key, entries.owner.mod_revision)],
            [Put(entries.owner.key, Owner.settled(self.node).encode())],
        )
        if not result.succeeded:
            return False
        why = (f"its source {source} was lost during the switch-over (its lease is gone); "
               f"owner {self.node} from revision {result.revision}")  # fmt: skip
        outcome = await destination.finish_without_source(job, why)
        resumed = outcome.state is IncomingState.DONE
        if resumed:
            self.cvms.mark(uuid, m.cluster)
        await self._event(m, "vm-resumed-without-source" if resumed else "vm-start-failed",
                          uuid, entries, why if resumed else f"{why}: {outcome.error}")  # fmt: skip
        return True

    async def _source_lost(self, m: Membership, owner: Owner, source: str,
                           alive: set[str]) -> bool:  # fmt: skip
        """Whether the source node of an incoming move is gone (no lease in its cluster)."""
        if owner.pending:  # a move within this cluster
            return owner.source is not None and owner.source not in alive
        # Settled here while it still arrives: handed over from another cluster.
        clusters = cluster_names([e.key for e in await m.store.range(ROOT)
                                  if e.key.endswith("/meta")])  # fmt: skip
        for cluster in clusters:
            keys = ClusterKeys(cluster)
            if cluster != m.cluster and await m.store.get(keys.member(source)) is not None:
                return await m.store.get(keys.alive(source)) is None
        return False

    async def _stop(self, m: Membership, uuid: str, entries: RoleEntries, name: str) -> None:
        """Stop VM ``name`` cleanly, as ``vm stop`` does, if it is still wanted off."""
        try:
            want = await m.store.get(m.keys.vm_want(uuid))
            if decode_want(want.value if want else None) is not Want.OFF:
                return  # started again meanwhile
            _, forced = await self.vms.stop(name)
            how = "forced off after the stop timeout" if forced else "shut down cleanly"
            log.info("stopped clustered VM %s (want off): %s", name, how)
            await self._event(m, "vm-stopped", uuid, entries, f"wanted off: {how}")
        except FerryError as exc:
            log.warning("reconcile stop of VM %s: %s", name, exc)
        except Exception:
            log.exception("reconcile stop of VM %s failed", name)
        finally:
            self._stopping.pop(uuid, None)
            self._live.discard(uuid)  # off on purpose, not by its guest
            self._live_want.pop(uuid, None)
            self._wake.set()  # publish its state

    def _register(self, m: Membership, role: VmRole) -> VmRecord:
        record = self.vms.catalog.add_vm(role.spec)
        self.cvms.mark(role.spec.uuid, m.cluster)
        log.info("registered clustered VM %s from the cluster's config", role.spec.name)
        return record

    async def _settle(self, m: Membership, action: Action, owner: Owner, entry: Entry) -> None:
        """A pending move ends: the owner settles on whoever runs (or may run) the VM."""
        node = owner.source if action is Action.RECLAIM else owner.node
        assert node is not None
        result = await m.store.txn([Compare.unchanged(entry.key, entry.mod_revision)],
                                   [Put(entry.key, Owner.settled(node).encode())])  # fmt: skip
        if result.succeeded:
            log.info("pending move of %s settled on %s (%s)", entry.key, node, action.value)

    async def _event(self, m: Membership, kind: str, uuid: str, entries: RoleEntries,
                     reason: str) -> None:  # fmt: skip
        name = uuid
        if entries.config is not None:
            with contextlib.suppress(FerryError):
                name = decode_role(entries.config.value, key=entries.config.key).spec.name
        with contextlib.suppress(FerryError):
            await m.record_event(kind, vm=name, node=self.node, reason=reason)
