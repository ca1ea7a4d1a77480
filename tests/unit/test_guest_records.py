"""The test guest's record format, the host-side reader, and the guest builder.

Disks here are files written by the tests in the exact layout the guest uses
(record ``seq`` at slot ``(seq - 1) % slots``), so the reader's verdicts can be
checked against a known history: wrap-around, torn blocks, foreign data,
sparse multi-GiB images and qcow2 read through qemu-img.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import stat
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from ferry.errors import GuestBuildError, InvalidInputError, NotFoundError
from ferry.guest import build, records
from ferry.guest.build import NewcArchive, default_cache_dir, dirty_memory_param
from ferry.guest.records import (
    DISKS_LINE,
    MAGIC,
    RECORD_SIZE,
    UP_LINE,
    RecordScan,
    encode_record,
    instant_mismatch,
    is_one_instant,
    read_disk_set,
    read_records,
    scan_raw,
    slot_for,
)

QEMU_IMG = shutil.which("qemu-img")
needs_qemu_img = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img not installed")


def write_history(path: Path, slots: int, last: int, *, first: int = 1) -> None:
    """Write records first..last the way the guest does, on a disk of ``slots``."""
    with path.open("r+b" if path.exists() else "w+b") as f:
        f.truncate(slots * RECORD_SIZE)
        for seq in range(first, last + 1):
            f.seek(slot_for(seq, slots) * RECORD_SIZE)
            f.write(encode_record(seq))


def put_block(path: Path, slot: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(slot * RECORD_SIZE)
        f.write(data)


# --- the format ----------------------------------------------------------------


def test_record_is_a_header_line_and_62_body_lines() -> None:
    block = encode_record(42)
    assert len(block) == RECORD_SIZE
    lines = block.split(b"\n")[:-1]
    assert [len(line) for line in lines] == [127] + [63] * 62
    magic, digits, checksum = lines[0].split()
    assert magic == MAGIC == b"FERRYREC1"
    assert digits == b"00000000000000000042"
    assert checksum.decode() == hashlib.sha256(block[128:]).hexdigest()
    assert lines[1] == b"ferry-guest record 00000000000000000042 line 00................"
    assert lines[62] == b"ferry-guest record 00000000000000000042 line 61................"


def test_every_sector_of_a_record_depends_on_its_seq() -> None:
    # A write torn at any 512-byte sector boundary must not verify.
    one, two = encode_record(1), encode_record(2)
    for sector in range(0, RECORD_SIZE, 512):
        assert one[sector : sector + 512] != two[sector : sector + 512]


def test_encode_rejects_seq_out_of_range() -> None:
    for seq in (0, -1, 2**63):
        with pytest.raises(InvalidInputError):
            encode_record(seq)
    assert encode_record(2**63 - 1)[10:30] == b"09223372036854775807"


def test_slot_for_wraps_around() -> None:
    assert [slot_for(seq, 4) for seq in range(1, 10)] == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    assert slot_for(1, 1) == slot_for(7, 1) == 0
    with pytest.raises(InvalidInputError):
        slot_for(1, 0)
    with pytest.raises(InvalidInputError):
        slot_for(0, 4)


def test_scan_to_json() -> None:
    assert RecordScan(last_seq=7, count=5, corrupt=1).to_json() == {
        "last_seq": 7,
        "count": 5,
        "corrupt": 1,
    }


# --- several disks: one instant ---------------------------------------------------


@pytest.mark.parametrize(
    "last_seqs",
    [
        [0],
        [7],
        [0, 0, 0],  # the guest has not written yet
        [5, 5, 5],  # between two rounds
        [5, 4, 4],  # record 5 reached vda only
        [5, 5, 4],  # ... vda and vdb
        [1, 0, 0],  # the very first round, cut after vda
    ],
)
def test_every_cut_of_a_round_is_one_instant(last_seqs: list[int]) -> None:
    assert instant_mismatch(last_seqs) is None
    assert is_one_instant(last_seqs)


def test_a_cut_through_every_round_is_one_instant() -> None:
    # Replay the guest's writes and check every moment in between.
    disks = [0, 0, 0]
    for seq in range(1, 6):
        for index in range(len(disks)):
            disks[index] = seq
            assert is_one_instant(disks), disks


@pytest.mark.parametrize(
    ("last_seqs", "why"),
    [
        ([5, 3, 5], "2 apart"),  # a disk copied two records earlier
        ([9, 0, 0], "9 apart"),  # empty disks added to a guest that counted
        ([4, 5, 5], "disk 0 is behind disk 1"),  # vda copied before the others
        ([5, 4, 5], "disk 1 is behind disk 2"),
        ([6, 6, 5, 6], "disk 2 is behind disk 3"),
    ],
)
def test_disks_from_different_moments_are_not_one_instant(last_seqs: list[int], why: str) -> None:
    reason = instant_mismatch(last_seqs)
    assert reason is not None and why in reason
    assert ", ".join(f"disk {i} at {s}" for i, s in enumerate(last_seqs)) in reason
    assert not is_one_instant(last_seqs)


def test_one_instant_needs_disks_and_sane_seqs() -> None:
    with pytest.raises(InvalidInputError):
        instant_mismatch([])
    with pytest.raises(InvalidInputError):
        instant_mismatch([3, -1])


def test_disk_set_reads_each_disk_with_its_own_slots(tmp_path: Path) -> None:
    # The guest's three disks of different sizes, cut after record 12 reached vda.
    disks = [tmp_path / f"disk{i}.raw" for i in range(3)]
    write_history(disks[0], slots=64, last=12)
    write_history(disks[1], slots=16, last=11)
    write_history(disks[2], slots=4, last=11)  # wrapped twice
    found = read_disk_set(disks)
    assert found.scans == (
        RecordScan(last_seq=12, count=12, corrupt=0),
        RecordScan(last_seq=11, count=11, corrupt=0),
        RecordScan(last_seq=11, count=4, corrupt=0),
    )
    assert found.last_seq == 12 and found.verdict == "ok" and found.reason is None
    assert found.to_json() == {
        "last_seq": 12,
        "count": 27,
        "corrupt": 0,
        "one_instant": True,
        "verdict": "ok",
        "reason": None,
        "disks": [
            {"image": str(disks[0]), "last_seq": 12, "count": 12, "corrupt": 0},
            {"image": str(disks[1]), "last_seq": 11, "count": 11, "corrupt": 0},
            {"image": str(disks[2]), "last_seq": 11, "count": 4, "corrupt": 0},
        ],
    }
    # The same disks named in another order are not what the guest wrote.
    swapped = read_disk_set([disks[1], disks[0], disks[2]])
    assert swapped.verdict == "not-one-instant"
    assert swapped.reason is not None and "disk 0 is behind disk 1" in swapped.reason


def test_disk_set_verdicts(tmp_path: Path) -> None:
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    write_history(a, slots=32, last=20)
    write_history(b, slots=32, last=17)
    behind = read_disk_set([a, b])
    assert behind.verdict == "not-one-instant" and behind.to_json()["one_instant"] is False
    assert behind.reason is not None and "3 apart" in behind.reason
    write_history(b, slots=32, last=20, first=18)
    put_block(b, 3, encode_record(4)[:512] + encode_record(36)[512:])
    damaged = read_disk_set([a, b])
    assert damaged.mismatch is None and damaged.verdict == "damaged"
    assert damaged.reason == "disk 1 has 1 corrupt block"
    assert damaged.to_json()["corrupt"] == 1
    with pytest.raises(InvalidInputError):
        read_disk_set([])


def test_one_disk_set_reads_as_one_scan(tmp_path: Path) -> None:
    # `ferry guest records IMAGE --json` keeps the keys a one-disk reader used.
    disk = tmp_path / "disk.raw"
    write_history(disk, slots=8, last=21)
    found = read_disk_set([disk]).to_json()
    assert {k: found[k] for k in ("last_seq", "count", "corrupt")} == scan_raw(disk).to_json()
    assert found["verdict"] == "ok"


def test_console_lines() -> None:
    assert (m := DISKS_LINE.match("ferry-guest disks vda=12 vdb=12 vdc=11\r")) is not None
    assert m.group(1) == " vda=12 vdb=12 vdc=11"
    assert DISKS_LINE.match("ferry-guest disks") is None
    assert UP_LINE.match("ferry-guest disks vda=1 vdb=1") is None
    # Tests count "seq " on the console: the disks line must not add to it.
    assert "seq " not in "ferry-guest disks vda=12 vdb=12"


# --- scanning raw images ---------------------------------------------------------


def test_blank_disk_has_no_records(tmp_path: Path) -> None:
    disk = tmp_path / "blank.raw"
    disk.write_bytes(bytes(64 * RECORD_SIZE))
    assert scan_raw(disk) == RecordScan(last_seq=0, count=0, corrupt=0)


def test_round_trip_before_wrapping(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    write_history(disk, slots=64, last=37)
    assert scan_raw(disk) == RecordScan(last_seq=37, count=37, corrupt=0)


def test_wrap_around_keeps_the_newest_lap(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    write_history(disk, slots=8, last=21)
    assert scan_raw(disk) == RecordScan(last_seq=21, count=8, corrupt=0)


def test_torn_block_is_corrupt(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    write_history(disk, slots=8, last=20)
    # Record 21 goes to slot 4 over record 13; only its first sector landed.
    torn = encode_record(21)[:512] + encode_record(13)[512:]
    put_block(disk, 4, torn)
    assert scan_raw(disk) == RecordScan(last_seq=20, count=7, corrupt=1)
    # ... and the other way round: only the tail of the new record landed.
    put_block(disk, 4, encode_record(13)[:512] + encode_record(21)[512:])
    assert scan_raw(disk) == RecordScan(last_seq=20, count=7, corrupt=1)


def test_bad_checksum_bad_seq_and_wrong_slot_are_corrupt(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    write_history(disk, slots=16, last=10)
    flipped = bytearray(encode_record(3))
    flipped[2000] ^= 0x01
    put_block(disk, 2, bytes(flipped))
    put_block(disk, 5, MAGIC + b" 0000000000000000000x" + bytes(RECORD_SIZE - 30))
    put_block(disk, 12, encode_record(4))  # a valid record copied to the wrong offset
    assert scan_raw(disk) == RecordScan(last_seq=10, count=8, corrupt=3)


def test_foreign_data_is_ignored(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(32 * RECORD_SIZE))
    write_history(disk, slots=32, last=3)
    # Misaligned magic inside foreign data is not a record either.
    with disk.open("r+b") as f:
        f.seek(20 * RECORD_SIZE + 100)
        f.write(encode_record(21))
    assert scan_raw(disk) == RecordScan(last_seq=3, count=3, corrupt=0)


def test_slots_default_to_the_size_of_the_image(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    write_history(disk, slots=8, last=12)
    with disk.open("r+b") as f:  # a partial block at the end is not a slot
        f.truncate(8 * RECORD_SIZE + 1000)
    assert scan_raw(disk) == RecordScan(last_seq=12, count=8, corrupt=0)
    # Read with the wrong disk size, the second lap sits in the wrong place.
    assert scan_raw(disk, slots=16) == RecordScan(last_seq=8, count=4, corrupt=4)


def test_sparse_4gib_image_scans_fast(tmp_path: Path) -> None:
    disk = tmp_path / "sparse.raw"
    slots = 4 * 1024**3 // RECORD_SIZE
    with disk.open("wb") as f:
        f.truncate(slots * RECORD_SIZE)
    write_history(disk, slots=slots, last=3)
    put_block(disk, slots - 2, encode_record(slots - 1))
    assert disk.stat().st_blocks * 512 < 64 * 1024**2, "tmp dir does not keep files sparse"
    started = time.monotonic()
    assert scan_raw(disk) == RecordScan(last_seq=slots - 1, count=4, corrupt=0)
    assert time.monotonic() - started < 2.0


def test_missing_image_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        scan_raw(tmp_path / "nope.raw")
    with pytest.raises(NotFoundError):
        read_records(tmp_path / "nope.qcow2")


# --- images through qemu-img ------------------------------------------------------


@needs_qemu_img
def test_raw_image_is_scanned_in_place(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    write_history(disk, slots=64, last=70)
    assert read_records(disk) == RecordScan(last_seq=70, count=64, corrupt=0)


@needs_qemu_img
def test_qcow2_image_reads_like_its_raw_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = tmp_path / "disk.raw"
    write_history(raw, slots=256, last=300)
    put_block(raw, 100, encode_record(101)[:1024] + bytes(3072))  # torn
    qcow2 = tmp_path / "disk.qcow2"
    assert QEMU_IMG is not None
    subprocess.run(
        [QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True
    )
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    assert read_records(qcow2) == RecordScan(last_seq=300, count=255, corrupt=1)
    assert list(scratch.iterdir()) == [], "the raw temp copy was left behind"


@needs_qemu_img
def test_qemu_img_failure_is_a_guest_build_error(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(RECORD_SIZE))
    with pytest.raises(GuestBuildError, match="cannot run"):
        read_records(disk, qemu_img=str(tmp_path / "no-qemu-img"))
    fake = tmp_path / "qemu-img"
    fake.write_text("#!/bin/sh\necho 'boom: it broke' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(GuestBuildError, match="boom: it broke"):
        read_records(disk, qemu_img=str(fake))


# --- the newc cpio writer ---------------------------------------------------------


def parse_newc(data: bytes) -> list[tuple[str, int, bytes, int, int]]:
    """Independent reader: (name, mode, data, rdevmajor, rdevminor) per entry."""
    entries: list[tuple[str, int, bytes, int, int]] = []
    pos = 0
    while True:
        assert pos % 4 == 0
        header = data[pos : pos + 110]
        assert header[:6] == b"070701", f"bad magic at {pos}"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmaj, rmin, namesize = (fields[i] for i in (1, 6, 9, 10, 11))
        name = data[pos + 110 : pos + 110 + namesize]
        assert name.endswith(b"\0")
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos : pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == b"TRAILER!!!\0":
            assert pos == len(data)
            return entries
        entries.append((name[:-1].decode(), mode, body, rmaj, rmin))


def test_newc_archive_round_trip() -> None:
    archive = NewcArchive()
    archive.file("etc/acpi/PWRF/00000080", b"#!/bin/sh\n", 0o755)
    archive.file("/init", b"x" * 5)
    archive.symlink("bin/sh", "/bin/busybox")
    archive.char_device("dev/console", 5, 1)
    entries = parse_newc(archive.finish())
    by_name = {e[0]: e for e in entries}
    names = [e[0] for e in entries]
    # Parents come before their children.
    assert names[:4] == ["etc", "etc/acpi", "etc/acpi/PWRF", "etc/acpi/PWRF/00000080"]
    assert stat.S_ISDIR(by_name["etc/acpi"][1])
    assert by_name["etc/acpi/PWRF/00000080"][1:3] == (stat.S_IFREG | 0o755, b"#!/bin/sh\n")
    assert by_name["init"][2] == b"xxxxx"
    assert stat.S_ISLNK(by_name["bin/sh"][1]) and by_name["bin/sh"][2] == b"/bin/busybox"
    assert stat.S_ISCHR(by_name["dev/console"][1]) and by_name["dev/console"][3:] == (5, 1)
    assert "bin" in archive and "dev/console" in archive


def test_newc_archive_rejects_duplicates_and_escapes() -> None:
    archive = NewcArchive()
    archive.file("a", b"")
    with pytest.raises(GuestBuildError):
        archive.file("a", b"")
    with pytest.raises(GuestBuildError):
        archive.file("../etc/passwd", b"")


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox not installed")
def test_newc_archive_extracts_with_busybox_cpio(tmp_path: Path) -> None:
    archive = NewcArchive()
    archive.file("lib/modules/virtio.ko", bytes(range(256)) * 3 + b"odd")
    archive.file("init", b"#!/bin/sh\necho hi\n", 0o755)
    archive.symlink("bin/sh", "/bin/busybox")
    out = tmp_path / "root"
    out.mkdir()
    subprocess.run(["busybox", "cpio", "-i", "-d"], input=archive.finish(), cwd=out, check=True)
    assert (out / "lib/modules/virtio.ko").read_bytes() == bytes(range(256)) * 3 + b"odd"
    assert (out / "init").stat().st_mode & 0o777 == 0o755
    assert str((out / "bin/sh").readlink()) == "/bin/busybox"


# --- the guest builder ------------------------------------------------------------


def test_dirty_memory_param() -> None:
    assert dirty_memory_param(128 * 1024**2) == "ferry.dirty=128M"
    assert dirty_memory_param(2 * 1024**3) == "ferry.dirty=2G"
    assert dirty_memory_param(32 * 1024**2, pause_s=4) == "ferry.dirty=32M ferry.dirty_pause=4"
    assert dirty_memory_param(12 * 1024) == "ferry.dirty=12K"
    assert dirty_memory_param(1000) == "ferry.dirty=1000"
    with pytest.raises(InvalidInputError):
        dirty_memory_param(0)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FERRY_GUEST_CACHE", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("FERRY_GUEST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "ferry" / "guest"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "ferry" / "guest"


def test_missing_packages_name_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(GuestBuildError, match=r"apt-get install -y linux-image-cloud-amd64"):
        build.find_inputs(boot=tmp_path)
    dynamic = Path(shutil.which("ls") or "/bin/ls")
    with pytest.raises(GuestBuildError, match="busybox-static") as info:
        build._check_static(dynamic)
    assert "dynamically linked" in str(info.value)
    with pytest.raises(GuestBuildError, match="busybox-static"):
        build._check_static(tmp_path / "no-busybox")


def test_newest_cloud_kernel_wins(tmp_path: Path) -> None:
    for release in ("6.1.0-9-cloud-amd64", "6.1.0-56-cloud-amd64", "6.1.0-10-cloud-amd64"):
        (tmp_path / f"vmlinuz-{release}").write_bytes(b"k")
    (tmp_path / "vmlinuz-6.9.0-1-amd64").write_bytes(b"not cloud")
    assert build.find_kernel(tmp_path)[1] == "6.1.0-56-cloud-amd64"


def test_modules_found_through_modules_dep(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(
        "kernel/drivers/virtio/virtio_ring.ko.xz:\n"
        "kernel/drivers/block/virtio_blk.ko.zst: kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/input/evdev.ko:\n"
    )
    found = build.find_modules(tmp_path, ("virtio_ring", "virtio_blk", "button"))
    assert found == {
        "virtio_ring": tmp_path / "kernel/drivers/virtio/virtio_ring.ko.xz",
        "virtio_blk": tmp_path / "kernel/drivers/block/virtio_blk.ko.zst",
    }


def _have_guest_packages() -> bool:
    try:
        build.find_inputs()
    except GuestBuildError:
        return False
    return True


needs_packages = pytest.mark.skipif(
    not _have_guest_packages(), reason="linux-image-cloud-amd64 / busybox-static not installed"
)


@needs_packages
def test_initramfs_holds_init_busybox_and_modules() -> None:
    inputs = build.find_inputs()
    entries = {e[0]: e for e in parse_newc(gzip.decompress(build.build_initramfs(inputs)))}
    assert entries["init"][2] == inputs.init_script
    assert entries["init"][1] == stat.S_IFREG | 0o755
    assert entries["bin/busybox"][2] == inputs.busybox.read_bytes()
    assert entries["bin/sh"][2] == b"/bin/busybox"
    assert stat.S_ISCHR(entries["dev/console"][1]) and entries["dev/console"][3:] == (5, 1)
    for module in build.REQUIRED_MODULES:
        assert entries[f"lib/modules/{module}.ko"][2][:4] == b"\x7fELF"
    for directory in ("proc", "sys", "dev", "tmp", "run"):
        assert stat.S_ISDIR(entries[directory][1])
    # Same inputs, same bytes.
    assert build.build_initramfs(inputs) == build.build_initramfs(inputs)


@needs_packages
def test_ensure_guest_caches_and_rebuilds_when_init_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = build.ensure_guest(tmp_path)
    assert first.kernel.is_file() and first.initrd.is_file()
    assert "console=ttyS0" in first.append
    assert build.ensure_guest(tmp_path) == first
    stamp = first.initrd.stat().st_mtime_ns
    assert build.ensure_guest(tmp_path).initrd.stat().st_mtime_ns == stamp

    real = build.find_inputs

    def edited_init(**kwargs: Path) -> build.GuestInputs:
        inputs = real(**kwargs)
        return replace(inputs, init_script=inputs.init_script + b"# edited\n")

    monkeypatch.setattr(build, "find_inputs", edited_init)
    second = build.ensure_guest(tmp_path)
    assert second.initrd != first.initrd
    init = {e[0]: e[2] for e in parse_newc(gzip.decompress(second.initrd.read_bytes()))}["init"]
    assert init.endswith(b"# edited\n")

    forced = build.build_guest(tmp_path, force=True)
    assert forced == second and forced.initrd.is_file()


@needs_packages
def test_interrupted_build_never_looks_complete(tmp_path: Path) -> None:
    stale = tmp_path / ".build-crashed"
    stale.mkdir()
    (stale / "vmlinuz").write_bytes(b"half")
    guest = build.ensure_guest(tmp_path)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".lock", guest.kernel.parent.name])


@needs_packages
def test_concurrent_builds_agree(tmp_path: Path) -> None:
    results: list[build.GuestArtifacts] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(build.build_guest(tmp_path))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".build")] == []


def test_records_module_documents_the_format() -> None:
    doc = records.__doc__ or ""
    for needle in ("FERRYREC1", "slot_for", "(seq - 1) % slots", "sha256", "instant_mismatch"):
        assert needle in doc
