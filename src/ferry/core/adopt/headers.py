"""A disk file's first bytes, judged before ``qemu-img`` opens it.

``qemu-img info`` of a foreign image is not harmless: opening a VMDK text
descriptor opens every extent file it names (any host path, a FIFO that never
answers), and a qcow2's header can name a backing or an external data file.
So each disk's header must be the binary kind the document declares: a sparse
VMDK (``KDMV``: streamOptimized and monolithicSparse), a qcow2 without a
backing file or an external data file, a VDI with its signature. Raw is raw.
"""

from __future__ import annotations

import struct

from ferry.errors import InvalidInputError

HEADER_BYTES = 512
_VDI_SIGNATURE = 0xBEDA107F
_QCOW2_DATA_FILE = 1 << 2  # incompatible feature bit: an external data file


def check_header(fmt: str, head: bytes, *, what: str) -> None:
    """Refuse ``head`` (a disk file's first bytes) unless it is a self-contained ``fmt``."""
    if fmt == "vmdk":
        if head[:4] != b"KDMV":
            kind = "a text descriptor" if head.lstrip().startswith(b"#") else "not a sparse VMDK"
            raise InvalidInputError(f"{what} is {kind}; ferry adopts single-file sparse VMDKs "
                                    "(streamOptimized, monolithicSparse)")  # fmt: skip
    elif fmt == "qcow2":
        if head[:4] != b"QFI\xfb" or len(head) < 104:
            raise InvalidInputError(f"{what} is not a qcow2 image (its header says otherwise)")
        version, backing_offset = struct.unpack(">IQ", head[4:16])
        if backing_offset:
            raise InvalidInputError(f"{what} has a backing file; only self-contained images are "
                                    "adopted (flatten it with qemu-img convert)")  # fmt: skip
        if version >= 3:
            (incompatible,) = struct.unpack(">Q", head[72:80])
            if incompatible & _QCOW2_DATA_FILE:
                raise InvalidInputError(f"{what} keeps its data in another file; refused")
    elif fmt == "vdi":
        if len(head) < 68 or struct.unpack("<I", head[64:68])[0] != _VDI_SIGNATURE:
            raise InvalidInputError(f"{what} is not a VDI image (no VDI signature)")
    elif fmt != "raw":
        raise InvalidInputError(f"{what}: ferry does not adopt {fmt} images")
