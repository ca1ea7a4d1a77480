"""Replication of running VMs.

The primary's side: relationships (``primary``), cycles (``cycle``), their
schedule (``scheduler``), what goes to the receiving host (``sender``: the
offer, the point streams), and the relationship following a live move
(``handover``). The replica's side: the receiver (``receiver``), its recovery
point chains (``chain``), admission (``server``). Around them: extended
replication (``extension``), initial copies on media (``initial_media``),
moving a replica VM (``replica_move``), ``replication status``
(``status``) and the peer endpoints (``endpoints``, the wire format being
:mod:`ferry.peer.replication`).
"""
