"""Host services of a cluster node: membership, election, HA, volumes, clustered VMs, fencing."""
