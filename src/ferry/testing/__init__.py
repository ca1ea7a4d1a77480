"""Public test fakes: host services exercised without QEMU, sockets or a clock.

- :mod:`ferry.testing.peers`: an in-memory peer network; each host's
  :class:`ferry.peer.server.PeerServer` answers the others' clients directly.
- :mod:`ferry.testing.clock`: a fake :class:`~ferry.core.clock.Clock` whose
  time moves only when a test advances it (the cycle scheduler takes one).
- :mod:`ferry.testing.vms`: a VM service without QEMU over a real catalog;
  states change through the real table, calls are recorded.
- :mod:`ferry.testing.failover`: hosts with the real failover service, job
  registry and replica store on a memory network, and a replicated VM.

Integration tests still use the real things (QEMU, TLS, SQLite); these fakes
are for the fast unit tests of host services, and later issues use them too.
"""
