"""copy_hashed: one pass copies a file sparsely and returns the SHA-256 of its content."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ferry.adapters import hashed_copy
from ferry.adapters.hashed_copy import copy_hashed, sha256_file

MiB = 1024**2
PIECE = 64 * 1024  # small pieces, so small files cross piece edges and holes


@pytest.fixture(autouse=True)
def _small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hashed_copy, "PIECE", PIECE)
    monkeypatch.setattr(hashed_copy, "_ZEROES", bytes(PIECE))


def _sparse_file(path: Path) -> bytes:
    """Data, a hole, a written piece of zeroes, data across a piece edge, a hole at the end."""
    with path.open("wb") as out:
        out.write(b"a" * (3 * PIECE + 5))
        out.seek(2 * MiB)
        out.write(bytes(PIECE))  # allocated, but zeroes
        out.write(b"b" * (PIECE + 17))
        out.truncate(4 * MiB + 3)
    return path.read_bytes()


def test_the_copy_reads_the_same_and_its_hash_is_the_contents(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    content = _sparse_file(src)
    heard: list[int] = []
    digest = copy_hashed(src, dst, heard.append)
    assert digest == hashlib.sha256(content).hexdigest() == sha256_file(src)
    assert dst.read_bytes() == content
    assert sum(heard) == len(content)
    # holes and the written zeroes stay holes: only the two data runs take space
    data = 3 * PIECE + 5 + PIECE + 17
    assert dst.stat().st_blocks * 512 < data + 64 * 1024


def test_a_changed_byte_changes_the_hash(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _sparse_file(src)
    first = copy_hashed(src, tmp_path / "one")
    with src.open("r+b") as handle:
        handle.seek(3 * MiB)  # inside the trailing hole
        handle.write(b"x")
    assert copy_hashed(src, tmp_path / "two") != first


def test_an_empty_file_and_an_existing_target(tmp_path: Path) -> None:
    src = tmp_path / "empty"
    src.write_bytes(b"")
    assert copy_hashed(src, tmp_path / "copy") == hashlib.sha256(b"").hexdigest()
    with pytest.raises(FileExistsError):
        copy_hashed(src, tmp_path / "copy")  # never overwrites
    assert (tmp_path / "copy").stat().st_size == 0
