"""Failover: test, planned and unplanned failover of replicated VMs, and reverse.

:mod:`.service` wires the operations together as jobs; :mod:`.steps` holds
what they share; :mod:`.drill` (test failover), :mod:`.unplanned` (start,
complete, cancel), :mod:`.split_brain` (the guard, both ends), :mod:`.planned`,
:mod:`.reverse` and :mod:`.recovery` (after a restart) one concept each. The
states and phases are :mod:`ferry.core.failover`; the wire format
:mod:`ferry.peer.failover`.
"""
