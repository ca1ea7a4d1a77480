"""The one writer of VM states: an operation, applied by the table, written down.

Every state change of a VM on this host goes through :meth:`VmStates.apply`:
it reads the state the catalog holds now (not a caller's old copy), applies
the operation by :data:`ferry.core.vmstate.TRANSITIONS` (a StateError naming
both states if the operation is not allowed there), writes the catalog and
logs the change on the VM's child logger as one line::

    state running -> migrating by migrate (vm 6f1c...)

so one VM's life on a host can be followed in the agent's log (the
integration tests read these lines). An operation that leaves the state as it
was writes nothing. A guard test keeps ``Catalog.set_state`` called only here.
A VM's first state is not a change: the catalog takes it with the new record
(``Catalog.add_vm``).
"""

from __future__ import annotations

import logging

from ferry.adapters.catalog import Catalog, VmRecord
from ferry.core import vmstate
from ferry.core.vmstate import VmOp, VmState
from ferry.errors import NotFoundError

log = logging.getLogger(__name__)


class VmStates:
    """Applies operations to the VM states in one host's catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def apply(self, vm: VmRecord | str, op: VmOp) -> VmState:
        """Apply ``op`` to the VM's current state (record or UUID); the new state."""
        uuid = vm if isinstance(vm, str) else vm.uuid
        record = self.catalog.find(uuid)
        if record is None:
            raise NotFoundError(f"no VM with UUID {uuid} on this host")
        state = vmstate.transition(record.state, op, vm=record.name)
        vm_log = log.getChild(record.name)
        if state is record.state:
            vm_log.debug("state %s stays by %s (vm %s)", state.value, op.value, uuid)
            return state
        self.catalog.set_state(uuid, state)
        vm_log.info("state %s -> %s by %s (vm %s)", record.state.value, state.value, op.value,
                    uuid)  # fmt: skip
        return state
