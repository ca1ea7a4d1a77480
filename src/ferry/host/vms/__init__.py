"""A host's VMs: the catalog-backed store, QEMU processes and their watchers, refresh."""
