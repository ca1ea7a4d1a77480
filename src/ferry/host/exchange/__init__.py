"""Export and import of VMs as self-contained folders."""
