"""Live migration between hosts: the source's move job, the destination's side, restart recovery."""
