"""Property tests of the export folder checks: an untrusted folder's files never crash them.

``parse_manifest`` and ``parse_vm`` read files an admin was handed; whatever
the bytes, they return a checked model or raise InvalidInputError (one line
for the CLI), and every name they accept is one plain file inside the folder.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferry.core.export_format import (
    FORMAT,
    FORMAT_VERSION,
    Manifest,
    check_file_name,
    parse_manifest,
    parse_vm,
)
from ferry.errors import InvalidInputError
from tests.unit.strategies import fast, json_values

FAST = fast(50)

names = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["disk0.qcow2", "vm.json", "../etc", "a/b", ".hidden", "..", ".", "a..b",
                     "kernel", "x" * 200, "disk0.qcow2\n", "C:\\x"]),
)  # fmt: skip

SHA = "0" * 64


def _manifest_docs() -> st.SearchStrategy[dict[str, Any]]:
    file_entry = st.fixed_dictionaries(
        {"path": names, "size": st.integers(-5, 2**64),
         "sha256": st.sampled_from([SHA, "xyz", "A" * 64])},
        optional={"extra": json_values},
    )  # fmt: skip
    return st.fixed_dictionaries(
        {"format": st.sampled_from([FORMAT, "other"]),
         "version": st.sampled_from([FORMAT_VERSION, 2]), "vm": names,
         "files": st.lists(file_entry, max_size=4)},
        optional={"more": json_values},
    )  # fmt: skip


def _manifest_or_refusal(raw: bytes) -> Manifest | None:
    try:
        manifest = parse_manifest(raw, folder="/exports/x")
    except InvalidInputError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("/exports/x: ")
        return None
    for name in [manifest.vm, *(f.path for f in manifest.files)]:
        assert "/" not in name and "\\" not in name and not name.startswith(".")
        assert ".." not in name
    assert manifest.vm in {f.path for f in manifest.files}
    return manifest


@FAST
@given(st.binary(max_size=300))
def test_arbitrary_bytes_as_manifest(raw: bytes) -> None:
    _manifest_or_refusal(raw)


@FAST
@given(json_values)
def test_arbitrary_json_as_manifest(doc: object) -> None:
    _manifest_or_refusal(json.dumps(doc).encode())


@FAST
@given(_manifest_docs())
def test_manifest_shaped_documents(doc: dict[str, Any]) -> None:
    _manifest_or_refusal(json.dumps(doc).encode())


@FAST
@given(names)
def test_accepted_file_names_are_plain(name: str) -> None:
    try:
        check_file_name(name)
    except ValueError:
        return
    assert "/" not in name and not name.startswith(".") and ".." not in name
    assert name.strip() == name and len(name) <= 128


def _vm_docs() -> st.SearchStrategy[dict[str, Any]]:
    small = st.one_of(st.integers(-2, 2**41), json_values)
    disk = st.fixed_dictionaries({"file": names, "size": small,
                                  "format": st.sampled_from(["qcow2", "raw", "vmdk"])})  # fmt: skip
    nic = st.fixed_dictionaries({"network": names, "mac": st.sampled_from(
        ["52:54:00:12:34:56", "01:00:5e:00:00:01", "zz", ""]), "model": names})  # fmt: skip
    return st.fixed_dictionaries(
        {"name": names, "uuid": st.sampled_from(["6b3b3f0e-2d39-4a2b-9a53-0d5a8f1c2e11", "x"]),
         "config_version": small, "memory": small, "cpus": small,
         "disks": st.lists(disk, max_size=3)},
        optional={"kernel": names, "initrd": names, "append": st.text(max_size=10) | small,
                  "firmware": st.sampled_from(["bios", "uefi", "coreboot"]),
                  "vars_disk": small, "boot_disk": small, "nics": st.lists(nic, max_size=2),
                  "cpu_model": names, "display": names, "replication": json_values},
    )  # fmt: skip


MANIFEST = Manifest(format=FORMAT, version=FORMAT_VERSION, vm="vm.json",
                    files=[{"path": "vm.json", "size": 1, "sha256": SHA},
                           {"path": "disk0.qcow2", "size": 1, "sha256": SHA}])  # fmt: skip


@FAST
@given(st.one_of(_vm_docs(), json_values))
def test_vm_documents_parse_or_are_refused(doc: object) -> None:
    try:
        vm = parse_vm(json.dumps(doc).encode(), MANIFEST, folder="/exports/x")
    except InvalidInputError as exc:
        assert "\n" not in str(exc)
        return
    listed = {f.path for f in MANIFEST.files}
    assert all(d.file in listed for d in vm.disks)
    assert vm.kernel in (None, *listed) and vm.initrd in (None, *listed)


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b"[]", b"null", b'{"format": 1}'])
def test_some_known_bad_manifests(raw: bytes) -> None:
    assert _manifest_or_refusal(raw) is None


@pytest.mark.parametrize("name", ["disk0.qcow2\n", "vm.json\n"])
def test_a_trailing_newline_is_not_a_plain_name(name: str) -> None:
    """Found by the property above: ``re.match`` with ``$`` let a final newline through."""
    from ferry.core.network import check_ifname
    from ferry.core.spec import check_name

    with pytest.raises(ValueError, match="not a plain file name"):
        check_file_name(name)
    with pytest.raises(InvalidInputError):
        check_name("vm1\n")
    with pytest.raises(InvalidInputError):
        check_ifname("br0\n")
