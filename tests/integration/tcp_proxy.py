"""The TCP proxy tests put between an agent and etcd: now ``ferry.testing.fault_proxy``.

Kept under its old name for the tests that import it: ``TcpProxy`` is
:class:`~ferry.testing.fault_proxy.FaultProxy` (``cut``/``restore`` as before,
plus drop, delay, cut mid-stream and corrupt).
"""

from __future__ import annotations

from ferry.testing.fault_proxy import HOST, FaultProxy
from ferry.testing.fault_proxy import fault_proxy as tcp_proxy

TcpProxy = FaultProxy

__all__ = ["HOST", "TcpProxy", "tcp_proxy"]
