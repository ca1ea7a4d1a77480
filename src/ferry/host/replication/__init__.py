"""Replication: the primary's relationships, cycles and schedule; the replica's receiver and recovery points; extension, initial media, replica moves."""
