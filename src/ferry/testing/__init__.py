"""Public test fakes: host services exercised without QEMU, sockets or a clock.

- :mod:`ferry.testing.peers`: an in-memory peer network; each host's
  :class:`ferry.peer.server.PeerServer` answers the others' clients directly.
- :mod:`ferry.testing.clock`: a fake :class:`~ferry.core.clock.Clock` whose
  time moves only when a test advances it (the cycle scheduler takes one).

Integration tests still use the real things (QEMU, TLS, SQLite); these fakes
are for the fast unit tests of host services, and later issues use them too.
"""
