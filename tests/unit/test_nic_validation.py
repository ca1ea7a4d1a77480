"""A NIC's MAC, model and network go into QEMU's -device option: whatever a
peer's spec, an export folder or the catalog says, injected values are refused
when the model is built, so qemu_argv never sees them."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from ferry.core.export_format import ExportedNic, parse_manifest, parse_vm
from ferry.core.spec import NicSpec, RunContext, VmSpec, qemu_argv
from ferry.errors import InvalidInputError

CTX = RunContext(
    qemu_binary="qemu-system-x86_64",
    accelerator="tcg",
    pidfile=Path("/d/vm/qemu.pid"),
    qmp_socket=Path("/run/f/x.qmp"),
    serial_log=Path("/d/vm/serial.log"),
    tap_host="ab12",
)
GOOD = {"network": "lab", "mac": "52:54:00:12:34:56", "model": "virtio"}
BAD = [
    {"mac": "52:54:00:00:00:01,romfile=/x"},
    {"mac": "52:54:00:00:00:01 "},
    {"mac": "52:54:00:AA:00:01"},  # not canonical: stored MACs are lower case
    {"mac": "01:00:5e:00:00:01"},  # multicast
    {"mac": "00:00:00:00:00:00"},
    {"mac": ""},
    {"model": "e1000,romfile=/x"},
    {"model": "virtio-net-pci,netdev=net0 -device x"},
    {"model": ""},
    {"model": "-e1000"},
    {"network": "lab,x=1"},
    {"network": "../lab"},
    {"network": ""},
]


def _spec(nic: dict[str, str]) -> dict[str, object]:
    return {"name": "web", "config_version": 1, "memory": 64 * 1024**2, "nics": [nic]}


@pytest.mark.parametrize("bad", BAD, ids=lambda b: repr(b))
def test_an_injected_nic_field_is_refused_by_the_spec(bad: dict[str, str]) -> None:
    nic = {**GOOD, **bad}
    with pytest.raises(ValidationError):
        NicSpec(**nic)
    # A peer's spec (moves, replicas) arrives as JSON: refused before any argv.
    with pytest.raises(ValidationError):
        VmSpec.model_validate_json(json.dumps(_spec(nic)))
    with pytest.raises(ValidationError):
        ExportedNic.model_validate(nic)


@pytest.mark.parametrize("bad", BAD, ids=lambda b: repr(b))
def test_an_export_folder_with_an_injected_nic_is_refused(bad: dict[str, str]) -> None:
    vm = {"name": "web", "uuid": "6f1c2b9e-2a57-4c1e-9a43-0d6f5d7f9b11", "config_version": 3,
          "memory": 134217728, "cpus": 1, "append": None, "kernel": None, "initrd": None,
          "disks": [{"file": "disk0.qcow2", "size": 1048576, "format": "qcow2"}],
          "replication": None, "nics": [{**GOOD, **bad}]}  # fmt: skip
    files = [{"path": n, "size": 1, "sha256": "a" * 64} for n in ("vm.json", "disk0.qcow2")]
    manifest = parse_manifest(
        json.dumps(
            {"format": "ferry-export", "version": 1, "vm": "vm.json", "files": files}
        ).encode(),
        folder="/f",
    )
    with pytest.raises(InvalidInputError):
        parse_vm(json.dumps(vm).encode(), manifest, folder="/f")
    good = parse_vm(json.dumps({**vm, "nics": [GOOD]}).encode(), manifest, folder="/f")
    assert good.nics[0].mac == GOOD["mac"]


def test_a_valid_nic_reaches_qemu_argv_as_one_device_option() -> None:
    spec = VmSpec.model_validate(_spec({**GOOD, "model": "e1000"}))
    argv = qemu_argv(spec, CTX)
    devices = [
        argv[i + 1] for i, a in enumerate(argv) if a == "-device" and "netdev=" in argv[i + 1]
    ]
    assert devices == ["e1000,netdev=net0,mac=52:54:00:12:34:56,id=nic0"]
    # Still valid after a round trip through the catalog's JSON.
    assert VmSpec.model_validate_json(spec.model_dump_json()) == spec


def test_a_typed_or_adopted_model_that_cannot_be_one_is_one_clear_line() -> None:
    from ferry.core.adopt.plan import normalise_mac
    from ferry.core.network import parse_nic_option

    with pytest.raises(InvalidInputError, match="invalid NIC model"):
        parse_nic_option("lab,model=e1000;x")
    with pytest.raises(InvalidInputError, match="all-zero"):
        normalise_mac("00-00-00-00-00-00", what="domain.xml")
