"""Prometheus metrics of one agent (``GET /metrics``).

:mod:`.recorder` holds the counters and histograms that services bump where
an event happens (a replication cycle ends, a move ends, a lease renewal, a
fence); :mod:`.collector` reads the current state at scrape time (lag, health,
VM and job states). Both live in one :class:`~prometheus_client.CollectorRegistry`
per agent, never the process-wide default, so several agents in one process
(unit tests) do not share figures. The HTTP side is :mod:`ferry.api.metrics`.
"""
