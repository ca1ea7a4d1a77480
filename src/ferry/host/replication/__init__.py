"""Replication of running VMs.

The primary's side: relationships (``primary``), cycles (``cycle``) and their
schedule (``scheduler``). The replica's side: the receiver and its recovery
point chain (``receiver``), admission (``server``). Around them: extended
replication (``extension``), initial copies on media (``initial_media``) and
moving a replica VM (``replica_move``).
"""
