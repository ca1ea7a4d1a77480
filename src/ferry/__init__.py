"""Ferry: VM mobility and disaster recovery for KVM/QEMU hosts."""

__version__ = "0.1.0"
