"""Public test fakes: host services exercised without QEMU, sockets or a clock.

- :mod:`ferry.testing.peers`: an in-memory peer network; each host's
  :class:`ferry.peer.server.PeerServer` answers the others' clients directly.
- :mod:`ferry.testing.qmp`: a scripted QMP channel (replies per command,
  events, a record of every call) standing in for a QEMU.
- :mod:`ferry.testing.migration`: small models of a migrating source QEMU and
  of the destination's ``-incoming`` QEMU, built on that channel.
- :mod:`ferry.testing.clock`: a fake :class:`~ferry.core.clock.Clock` whose
  time moves only when a test advances it (the cycle scheduler takes one).
- :mod:`ferry.testing.vms`: a VM service without QEMU over a real catalog;
  states change through the real table, calls are recorded.
- :mod:`ferry.testing.store`: an in-memory cluster store with etcd's
  semantics (leases expire on a fake clock), and
  :mod:`ferry.testing.store_conformance`, the checks every store passes.
- :mod:`ferry.testing.failover`: hosts with the real failover service, job
  registry and replica store on a memory network, and a replicated VM.

Integration tests still use the real things (QEMU, TLS, SQLite); these fakes
are for the fast unit tests of host services, and later issues use them too.
"""
