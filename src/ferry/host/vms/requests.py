"""What a new VM is asked to be: the host's typed input for ``VmService.create``.

The API validates its wire model (``ferry.api.models.CreateVmRequest``) and
converts it to these; host code never sees the API's models. Sizes are bytes,
paths are as the admin gave them (checked against the host's image dirs when
the VM is made).
"""

from __future__ import annotations

from dataclasses import dataclass

from ferry.core.network import NicOption
from ferry.errors import InvalidInputError

DEFAULT_MEMORY = 256 * 1024**2


@dataclass(frozen=True)
class NewDisk:
    """An empty disk of ``size`` bytes, or a copy of the image at ``image``."""

    size: int | None = None
    image: str | None = None

    def __post_init__(self) -> None:
        if (self.size is None) == (self.image is None):
            raise InvalidInputError("a disk needs exactly one of size or image")


@dataclass(frozen=True)
class NewVm:
    name: str
    memory: int = DEFAULT_MEMORY
    cpus: int = 1
    disks: tuple[NewDisk, ...] = ()
    guest: str | None = None  # "test": the built-in test guest, with its kernel and initrd
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    config_version: int | None = None  # None: the host's functional level
    volume: str | None = None  # a shared volume's name: the disks go there
    # Kernel and initrd next to the disks on the volume (a clustered VM: every
    # node of the cluster boots it from there), not in the local VM dir.
    boot_files_on_volume: bool = False
    display: str = "none"  # "vnc": a VNC display on a unix socket
    nics: tuple[NicOption, ...] = ()  # --nic NETWORK[,mac=MAC][,model=MODEL], in order
    cpu_model: str | None = None  # None: the host's default (core/cpu_models.py)
    guest_agent: bool = False  # a virtio-serial channel for qemu-guest-agent
    firmware: str = "bios"  # "uefi": OVMF with the VM's own variable store
    boot_disk: int = 0  # which disk the firmware boots (0: the first, in the order given)
