"""Failover: test, planned and unplanned failover of replicated VMs, and reverse."""
