"""The export folder format, and the checks an untrusted folder must pass.

Pure: no I/O. An export folder is self-contained::

    manifest.json   {"format": "ferry-export", "version": 1,
                     "vm": "vm.json",
                     "files": [{"path": "disk0.qcow2", "size": N, "sha256": HEX}, ...]}
    vm.json         {"name", "uuid", "config_version", "memory", "cpus", "append",
                     "kernel": "kernel" | null, "initrd": "initrd" | null,
                     "disks": [{"file": "disk0.qcow2", "size": VIRTUAL, "format": "qcow2"}],
                     "replication": null | {...}, "display": "none" | "vnc",
                     "cpu_model": "Westmere-v1" | null,
                     "nics": [{"network": "lab", "mac": "52:54:00:12:34:56", "model": "virtio"}],
                     "firmware": "bios" | "uefi", "boot_disk": N,
                     "vars_disk": null | index of the UEFI variable store in "disks"}
    disk0.qcow2 ... consolidated qcow2 (no backing file), sparse
    kernel, initrd  when the VM boots a kernel directly

``manifest.json`` is written last, and the folder appears under its final
name only when complete (it is built as ``.<name>.partial``). Every name a
folder mentions must be a plain file name in the folder: no ``/``, no ``..``,
not hidden, not a symlink (the last is checked on disk by the importer).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ferry.core.cpu_models import MODEL_PATTERN
from ferry.core.firmware import check_vars_disk
from ferry.core.network import MAX_NICS, network_name_value, nic_mac_value, nic_model_value
from ferry.core.spec import NAME_RE
from ferry.core.validation import first_error
from ferry.errors import InvalidInputError

FORMAT = "ferry-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VM_FILE = "vm.json"
MAX_MANIFEST_BYTES = 1024 * 1024
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_file_name(name: str) -> str:
    """A name inside an export folder: one plain path component."""
    if not _FILE_RE.fullmatch(name) or name in (".", "..") or ".." in name:
        raise ValueError(f"{name!r} is not a plain file name inside the export folder")
    return name


# Every name a folder mentions is checked the same way, wherever it appears.
FileName = Annotated[str, AfterValidator(check_file_name)]


class ManifestFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: FileName
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str
    version: int
    vm: FileName
    files: list[ManifestFile] = Field(max_length=64)


class ExportedDisk(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: FileName
    size: int = Field(gt=0, le=64 * 1024**4)
    format: str = Field(pattern=r"^(qcow2|raw)$")


class ExportedNic(BaseModel):
    model_config = ConfigDict(extra="forbid")

    network: Annotated[str, AfterValidator(network_name_value)]
    mac: Annotated[str, AfterValidator(nic_mac_value)]
    model: Annotated[str, AfterValidator(nic_model_value)] = "virtio"


class ExportedVm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_RE.pattern)
    uuid: str = Field(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
    config_version: int = Field(ge=1, le=1000)
    memory: int = Field(gt=0)
    cpus: int = Field(gt=0, le=1024)
    append: str | None = Field(default=None, max_length=4096)
    kernel: FileName | None = None
    initrd: FileName | None = None
    disks: list[ExportedDisk] = Field(max_length=16)
    replication: dict[str, object] | None = None
    display: Literal["none", "vnc"] = "none"  # absent in folders made before it
    # A QEMU CPU model name; null (and absent in older folders): the legacy "max".
    cpu_model: str | None = Field(default=None, pattern=MODEL_PATTERN)
    # The VM's NICs with their MACs (absent in older folders: none).
    nics: list[ExportedNic] = Field(default_factory=list, max_length=MAX_NICS)
    # Firmware (absent in older folders: BIOS, booting the first disk).
    firmware: Literal["bios", "uefi"] = "bios"
    boot_disk: int = Field(default=0, ge=0, le=16)
    vars_disk: int | None = Field(default=None, ge=0, le=16)

    @model_validator(mode="after")
    def _firmware_fits(self) -> ExportedVm:
        check_vars_disk(self.firmware, self.vars_disk, len(self.disks))
        return self


def parse_manifest(raw: bytes, *, folder: str) -> Manifest:
    if len(raw) > MAX_MANIFEST_BYTES:
        raise InvalidInputError(f"{folder}: {MANIFEST} is too large to be a ferry manifest")
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidInputError(f"{folder}: malformed {MANIFEST}: {first_error(exc)}") from exc
    if manifest.format != FORMAT or manifest.version != FORMAT_VERSION:
        raise InvalidInputError(
            f"{folder}: not a ferry export of format version {FORMAT_VERSION} "
            f"(found {manifest.format!r} version {manifest.version})"
        )
    names = [f.path for f in manifest.files]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"{folder}: {MANIFEST} lists a file twice")
    if manifest.vm not in names:
        raise InvalidInputError(f"{folder}: {MANIFEST} does not list {manifest.vm} with a checksum")
    return manifest


def parse_vm(raw: bytes, manifest: Manifest, *, folder: str) -> ExportedVm:
    try:
        vm = ExportedVm.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidInputError(f"{folder}: malformed {manifest.vm}: {first_error(exc)}") from exc
    listed = {f.path for f in manifest.files}
    needed = [d.file for d in vm.disks] + [n for n in (vm.kernel, vm.initrd) if n]
    for name in needed:
        if name not in listed:
            raise InvalidInputError(f"{folder}: {name} is used by the VM but not in the manifest")
    return vm
