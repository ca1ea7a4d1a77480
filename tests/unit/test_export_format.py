import json

import pytest

from ferry.core.export_format import check_file_name, parse_manifest, parse_vm
from ferry.errors import InvalidInputError

SUM = "a" * 64
VM = {"name": "web", "uuid": "6f1c2b9e-2a57-4c1e-9a43-0d6f5d7f9b11", "config_version": 3,
      "memory": 134217728, "cpus": 1, "append": None, "kernel": "kernel", "initrd": None,
      "disks": [{"file": "disk0.qcow2", "size": 1048576, "format": "qcow2"}],
      "replication": None}  # fmt: skip


def manifest(*names: str, **extra: object) -> bytes:
    files = [{"path": n, "size": 1, "sha256": SUM} for n in names]
    return json.dumps({"format": "ferry-export", "version": 1, "vm": "vm.json",
                       "files": files, **extra}).encode()  # fmt: skip


def test_a_good_folder_parses() -> None:
    parsed = parse_manifest(manifest("vm.json", "disk0.qcow2", "kernel"), folder="/f")
    vm = parse_vm(json.dumps(VM).encode(), parsed, folder="/f")
    assert vm.name == "web" and vm.disks[0].file == "disk0.qcow2"
    assert vm.display == "none"  # folders made before the field have none
    vnc = parse_vm(json.dumps({**VM, "display": "vnc"}).encode(), parsed, folder="/f")
    assert vnc.display == "vnc"


@pytest.mark.parametrize(
    "name", ["../etc/passwd", "/etc/passwd", "a/b", ".hidden", "..", "x..y", "", "a" * 200]
)
def test_names_that_leave_the_folder_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="plain file name"):
        check_file_name(name)
    with pytest.raises(InvalidInputError, match=r"malformed manifest\.json"):
        parse_manifest(manifest("vm.json", name), folder="/f")


def test_manifest_shape_is_checked() -> None:
    with pytest.raises(InvalidInputError, match="not a ferry export"):
        parse_manifest(manifest("vm.json", version=2), folder="/f")
    with pytest.raises(InvalidInputError, match="lists a file twice"):
        parse_manifest(manifest("vm.json", "d", "d"), folder="/f")
    with pytest.raises(InvalidInputError, match=r"does not list vm\.json"):
        parse_manifest(manifest("d"), folder="/f")
    with pytest.raises(InvalidInputError, match=r"malformed manifest\.json"):
        parse_manifest(b"{not json", folder="/f")
    with pytest.raises(InvalidInputError, match="too large"):
        parse_manifest(b" " * (2 * 1024 * 1024), folder="/f")


def test_the_vm_may_only_use_files_the_manifest_vouches_for() -> None:
    parsed = parse_manifest(manifest("vm.json", "disk0.qcow2"), folder="/f")
    with pytest.raises(InvalidInputError, match="kernel is used by the VM but not in the manifest"):
        parse_vm(json.dumps(VM).encode(), parsed, folder="/f")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"uuid": "x"}, "uuid"),
        ({"name": "bad name"}, "name"),
        ({"disks": [{"file": "../d", "size": 1, "format": "qcow2"}]}, "disks.0.file"),
        ({"disks": [{"file": "d", "size": 1, "format": "vmdk"}]}, "disks.0.format"),
        ({"memory": -1}, "memory"),
        ({"surprise": 1}, "surprise"),
        ({"display": "spice"}, "display"),
    ],
)
def test_malformed_configs_are_refused(change: dict[str, object], message: str) -> None:
    parsed = parse_manifest(manifest("vm.json", "disk0.qcow2", "kernel"), folder="/f")
    with pytest.raises(InvalidInputError, match=f"malformed vm.json: {message}"):
        parse_vm(json.dumps({**VM, **change}).encode(), parsed, folder="/f")
