"""OS errors met in adapters reach callers as FerryErrors that name the file."""

from __future__ import annotations

import errno
import uuid
from pathlib import Path

import pytest

from ferry.adapters.durable import fsync_dir, fsync_file
from ferry.adapters.os_errors import os_error, os_errors
from ferry.adapters.point_transfer import PointReceiver, copy_sparse, encode_point
from ferry.errors import NotFoundError, StorageError


def test_a_missing_file_is_not_found() -> None:
    exc = FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/disk.qcow2")
    error = os_error("cannot read delta file /x/disk.qcow2", exc)
    assert isinstance(error, NotFoundError)
    assert str(error) == "cannot read delta file /x/disk.qcow2: /x/disk.qcow2 does not exist"


def test_any_other_os_error_is_a_storage_error_with_the_path() -> None:
    exc = OSError(errno.EIO, "Input/output error", "/r/p.partial")
    error = os_error("cannot write recovery point file /r/p.partial", exc)
    assert isinstance(error, StorageError)
    assert error.path == "/r/p.partial"
    assert str(error) == "cannot write recovery point file /r/p.partial: Input/output error"


def test_the_context_manager_chains_the_cause() -> None:
    with pytest.raises(StorageError) as caught, os_errors("cannot frob"):
        raise PermissionError(errno.EACCES, "Permission denied", "/etc/x")
    assert isinstance(caught.value.__cause__, PermissionError)


def test_adapters_translate_what_they_meet(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    with pytest.raises(NotFoundError, match=r"cannot make .*gone durable"):
        fsync_file(missing)
    with pytest.raises(NotFoundError, match=r"cannot make the names in .*gone durable"):
        fsync_dir(missing)
    with pytest.raises(NotFoundError, match="cannot copy"):
        copy_sparse(missing, tmp_path / "copy")
    with pytest.raises(NotFoundError, match="cannot read delta file"):
        list(encode_point([missing], vm_uuid=uuid.uuid4(), point_id=1))
    with pytest.raises(NotFoundError, match="cannot create recovery point files"):
        PointReceiver([missing / "p-disk0.qcow2"], vm_uuid=uuid.uuid4(), point_id=1)
