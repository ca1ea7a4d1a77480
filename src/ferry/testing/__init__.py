"""Public test fakes: host services exercised without QEMU, sockets or a clock.

- :mod:`ferry.testing.peers`: an in-memory peer network; each host's
  :class:`ferry.peer.server.PeerServer` answers the others' clients directly.

Integration tests still use the real things (QEMU, TLS, SQLite); these fakes
are for the fast unit tests of host services, and later issues use them too.
"""
