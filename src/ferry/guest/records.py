"""The test guest's on-disk records: the format, and the host-side reader.

The test guest (``init.sh``) counts: every 200 ms it writes the next sequence
number as one record to each of its disks, makes it durable, and only then
prints ``seq N`` on its console. Reading the records back from an image (a
replica, a migrated disk, a restored recovery point) tells a test how far the
guest got and whether any block arrived torn; reading every disk of a copy
tells whether the copy holds all disks as of one instant. This module is the
one place where the format is written down; ``init.sh`` writes the same bytes.
(Over 400 lines for that reason: the format, its reader and the one-instant
rule of several disks belong together.)

Record format (version 1)
-------------------------

A record is one 4096-byte block at a 4096-byte aligned offset of the disk. It
is plain ASCII text: a 128-byte header line, then 62 body lines of 64 bytes,
each line ending in ``\\n``::

    offset  size  content
         0     9  magic  b"FERRYREC1"  ("FERRYREC" + format version "1")
         9     1  b" "
        10    20  seq, decimal, zero-padded to 20 digits; 1 <= seq < 2**63
        30     1  b" "
        31    64  sha256 of bytes 128..4095, lowercase hex
        95    32  b" " * 32
       127     1  b"\\n"
       128  3968  62 body lines, line i (i = 0..61) being the 63 characters
                  "ferry-guest record " + seq as in bytes 10..29 +
                  " line " + i as 2 zero-padded digits + "." * 16,
                  then b"\\n"

Every 512-byte sector of a record depends on its seq, and the checksum in
the first sector covers the other seven, so a block torn between two writes
(or between a record and older data) fails verification.

Placement. A disk of ``size`` bytes has ``slots = size // 4096`` slots; record
``seq`` lives at slot ``slot_for(seq, slots) = (seq - 1) % slots``, i.e. byte
offset ``slot * 4096``. The guest writes seq 1, 2, 3, ... so the disk fills
from the front and then wraps, overwriting the oldest record. At any moment
slots ``0..k`` hold ``s0, s0+1, ..., s0+k`` (``s0`` = the seq in slot 0) and
every slot after ``k`` holds an older seq, a torn block or nothing; so the
guest finds the newest record with a binary search for the last slot ``s``
whose seq is ``s0 + s`` (O(log slots) block reads, cheap under TCG). If slot 0
itself does not verify (the write that wrapped around was torn), the newest
record is the one in the last slot, when that one verifies and belongs there.

Verification (this reader). A 4096-byte aligned block that starts with the
magic is a record when it is byte-for-byte ``encode_record(seq)`` for the seq
it carries and it sits at ``slot_for(seq, slots)``; otherwise it is counted as
corrupt (torn, damaged, or copied to the wrong offset). Blocks without the
magic are not records and are ignored.

Several disks. The guest writes record ``n`` to every disk in turn, in the
VM's disk order (``vda``, ``vdb``, ``vdc``, ...), each disk with its own
``slots`` (its own size // 4096) and its own wrap-around, and prints ``seq n``
once the last disk has it. The block format is the same on every disk (a
one-disk guest writes exactly what it always did). So at any instant the
disks' newest records read ``n, ..., n, n-1, ..., n-1``: a run of disks that
already have record ``n``, then those still at ``n - 1``. A copy of all the
disks cut at one instant (a recovery point, a live export, the disks after a
move) must look like that: see :func:`instant_mismatch`. At boot the guest
continues from the highest newest record of all disks; it first writes record
``MAX`` to any disk at ``MAX - 1`` (finishing the round the copy cut short),
and a disk further behind (an empty disk added later) joins at ``MAX + 1``
with a gap in its history, so its count stays below its newest seq.

Console protocol. The guest prints ``ferry-guest up last-seq=N`` once after
boot (``N`` = newest record on any disk, 0 on blank disks) and then ``seq N``
after record ``N`` is durable on every disk; see :data:`UP_LINE` and
:data:`SEQ_LINE`. With more than one disk it first prints
``ferry-guest disks vda=N vdb=M ...``, each disk's newest record as the
guest's binary search found it (see :data:`DISKS_LINE`).
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import GuestBuildError, InvalidInputError, NotFoundError

RECORD_SIZE = 4096
MAGIC = b"FERRYREC1"
HEADER_SIZE = 128
BODY_LINES = 62
MAX_SEQ = 2**63 - 1

UP_LINE = re.compile(r"^ferry-guest up last-seq=(\d+)\s*$")
"""The guest's first line after boot; group 1 is the newest seq found on disk."""
SEQ_LINE = re.compile(r"^seq (\d+)\s*$")
"""Printed after record N is on every disk; group 1 is N."""
DISKS_LINE = re.compile(r"^ferry-guest disks((?: vd[a-z]+=\d+)+)\s*$")
"""Printed before the up line by a guest with several disks; group 1 is
`` vda=N vdb=M ...``, each disk's newest record as found at boot."""

_BODY_TEMPLATE = "".join(
    f"ferry-guest record {{seq}} line {line:02d}{'.' * 16}\n" for line in range(BODY_LINES)
)
_READ_CHUNK = 1024 * 1024


def encode_record(seq: int) -> bytes:
    """Return the exact 4096 bytes the guest writes for record ``seq``."""
    if not 1 <= seq <= MAX_SEQ:
        raise InvalidInputError(f"record seq {seq} out of range 1..{MAX_SEQ}")
    digits = f"{seq:020d}"
    body = _BODY_TEMPLATE.format(seq=digits).encode("ascii")
    checksum = hashlib.sha256(body).hexdigest()
    header = f"{MAGIC.decode()} {digits} {checksum}{' ' * 32}\n".encode("ascii")
    assert len(header) == HEADER_SIZE and len(body) == RECORD_SIZE - HEADER_SIZE
    return header + body


def slot_for(seq: int, slots: int) -> int:
    """Return the slot (4 KiB block index) where record ``seq`` is written."""
    if slots <= 0:
        raise InvalidInputError(f"a record disk needs at least one 4 KiB slot, got {slots}")
    if seq < 1:
        raise InvalidInputError(f"record seq {seq} must be at least 1")
    return (seq - 1) % slots


def record_seq(block: bytes) -> int | None:
    """Return the seq a block claims, or None when it carries no magic.

    Returns -1 when the block has the magic but no readable seq; the claim is
    not verified (see :func:`verify_record`).
    """
    if not block.startswith(MAGIC):
        return None
    digits = block[10:30]
    if len(digits) != 20 or not digits.isdigit() or block[9:10] != b" ":
        return -1
    seq = int(digits)
    return seq if 1 <= seq <= MAX_SEQ else -1


def verify_record(block: bytes, offset: int, slots: int) -> int | None:
    """Return the seq of a valid record at byte ``offset``, else None."""
    seq = record_seq(block)
    if seq is None or seq < 1:
        return None
    if offset != slot_for(seq, slots) * RECORD_SIZE:
        return None
    return seq if block == encode_record(seq) else None


@dataclass(frozen=True)
class RecordScan:
    """What a full scan of a disk found.

    ``last_seq`` is the highest valid record (0 when there is none), ``count``
    the number of valid records and ``corrupt`` the number of blocks that
    carry the magic but do not verify.
    """

    last_seq: int
    count: int
    corrupt: int

    def to_json(self) -> dict[str, int]:
        return {"last_seq": self.last_seq, "count": self.count, "corrupt": self.corrupt}


class _Tally:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.last_seq = 0
        self.count = 0
        self.corrupt = 0

    def block(self, block: bytes, offset: int) -> None:
        if not block.startswith(MAGIC):
            return
        seq = verify_record(block, offset, self.slots)
        if seq is None:
            self.corrupt += 1
        else:
            self.count += 1
            self.last_seq = max(self.last_seq, seq)

    def result(self) -> RecordScan:
        return RecordScan(last_seq=self.last_seq, count=self.count, corrupt=self.corrupt)


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """Return the [start, end) byte ranges of ``fd`` that may hold data.

    Uses SEEK_DATA/SEEK_HOLE so a sparse multi-GiB image costs only its
    allocated extents; filesystems without them are read whole.
    """
    extents: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                break
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return [(0, size)]
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append((start, end))
        pos = end
    return extents


def scan_raw(path: Path, *, slots: int | None = None) -> RecordScan:
    """Scan a raw disk image (or block device) and verify every record in it.

    ``slots`` defaults to the file size // 4096, which is what the guest
    computes from its disk size.
    """
    try:
        with Path(path).open("rb", buffering=0) as f:
            fd = f.fileno()
            size = os.lseek(fd, 0, os.SEEK_END)
            nslots = size // RECORD_SIZE if slots is None else slots
            tally = _Tally(max(nslots, 1))
            end_of_slots = nslots * RECORD_SIZE
            done = 0  # every block before this offset has been looked at
            for start, end in _data_extents(fd, end_of_slots):
                # Extents follow filesystem blocks; widen them to whole records.
                offset = max(start - start % RECORD_SIZE, done)
                stop = min(-(-end // RECORD_SIZE) * RECORD_SIZE, end_of_slots)
                while offset < stop:
                    chunk = os.pread(fd, min(_READ_CHUNK, stop - offset), offset)
                    usable = len(chunk) - len(chunk) % RECORD_SIZE
                    if usable == 0:
                        break
                    for i in range(0, usable, RECORD_SIZE):
                        tally.block(chunk[i : i + RECORD_SIZE], offset + i)
                    offset += usable
                done = max(done, offset)
    except FileNotFoundError as exc:
        raise NotFoundError(f"disk image {path} does not exist") from exc
    except OSError as exc:
        raise GuestBuildError(f"cannot read guest records from {path}: {exc.strerror}") from exc
    return tally.result()


def _qemu_img(qemu_img: str, *args: str) -> str:
    try:
        proc = subprocess.run(
            [qemu_img, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )
    except OSError as exc:
        raise GuestBuildError(
            f"cannot run {qemu_img}: {exc.strerror}; install it with apt-get install -y qemu-utils"
        ) from exc
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.decode(errors="replace").splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise GuestBuildError(f"qemu-img {args[0]} failed: {reason}")
    return proc.stdout.decode(errors="replace")


def image_format(image: Path, *, qemu_img: str = "qemu-img") -> str:
    """Return the format qemu-img detects for ``image`` (``raw``, ``qcow2``, ...)."""
    if not Path(image).exists():
        raise NotFoundError(f"disk image {image} does not exist")
    out = _qemu_img(qemu_img, "info", "-U", "--output=json", str(image))
    try:
        fmt = json.loads(out)["format"]
    except (ValueError, KeyError, TypeError) as exc:
        raise GuestBuildError(f"qemu-img info gave no format for {image}") from exc
    if not isinstance(fmt, str):
        raise GuestBuildError(f"qemu-img info gave no format for {image}")
    return fmt


def read_records(image: Path, qemu_img: str = "qemu-img") -> RecordScan:
    """Scan the guest records of a disk image in any format qemu-img reads.

    Raw images are scanned in place. Others (qcow2, with its backing chain)
    are first converted to a sparse raw temp file, which is always removed.
    ``-U`` lets this read images a running QEMU holds open.
    """
    fmt = image_format(image, qemu_img=qemu_img)
    if fmt == "raw":
        return scan_raw(image)
    fd, tmp_name = tempfile.mkstemp(prefix="ferry-records-", suffix=".raw")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _qemu_img(qemu_img, "convert", "-U", "-f", fmt, "-O", "raw", str(image), str(tmp))
        return scan_raw(tmp)
    finally:
        tmp.unlink(missing_ok=True)


# --- several disks -------------------------------------------------------------


def instant_mismatch(last_seqs: Sequence[int]) -> str | None:
    """Say why the disks' newest records cannot be one instant of the guest, or None.

    ``last_seqs`` are the newest records of the VM's disks, in disk order. The
    guest writes record ``n`` to each disk in turn, first to last, so at any
    instant the disks read ``n, ..., n, n-1, ..., n-1`` (a disk that has ``n``
    is never after one that has not): a consistent cut across the disks
    differs by at most one record (``max - min <= 1``), and an earlier disk is
    never behind a later one. Anything else means the disks were copied at
    different moments (or one lost writes). One disk is always one instant;
    an empty disk added to a VM that already counted reads as not one instant
    until the guest has written to it.
    """
    if not last_seqs:
        raise InvalidInputError("no disks to compare: give at least one disk's records")
    if any(seq < 0 for seq in last_seqs):
        raise InvalidInputError(f"a newest record cannot be negative: {list(last_seqs)}")
    newest, oldest = max(last_seqs), min(last_seqs)
    if newest - oldest > 1:
        return (
            f"the disks' newest records are {newest - oldest} apart ({_listing(last_seqs)}); "
            "one instant differs by at most one"
        )
    for index, (earlier, later) in enumerate(itertools.pairwise(last_seqs)):
        if earlier < later:
            return (
                f"disk {index} is behind disk {index + 1} ({_listing(last_seqs)}); "
                "the guest writes each record to the earlier disk first"
            )
    return None


def is_one_instant(last_seqs: Sequence[int]) -> bool:
    """True when the disks' newest records could be one instant (:func:`instant_mismatch`)."""
    return instant_mismatch(last_seqs) is None


def _listing(last_seqs: Sequence[int]) -> str:
    return ", ".join(f"disk {i} at {seq}" for i, seq in enumerate(last_seqs))


@dataclass(frozen=True)
class DiskSetScan:
    """The records of every disk of a VM (or of a copy of it), in disk order.

    ``last_seq`` is the highest newest record (where the guest would go on
    from), ``corrupt`` the damaged blocks of all disks, and ``mismatch`` why
    the disks are not one instant (None when they are).
    """

    images: tuple[Path, ...]
    scans: tuple[RecordScan, ...]

    @property
    def last_seq(self) -> int:
        return max(scan.last_seq for scan in self.scans)

    @property
    def corrupt(self) -> int:
        return sum(scan.corrupt for scan in self.scans)

    @property
    def mismatch(self) -> str | None:
        return instant_mismatch([scan.last_seq for scan in self.scans])

    @property
    def verdict(self) -> str:
        """``ok``, ``damaged`` (a disk has corrupt blocks) or ``not-one-instant``."""
        if self.corrupt:
            return "damaged"
        return "ok" if self.mismatch is None else "not-one-instant"

    @property
    def reason(self) -> str | None:
        """Why the verdict is not ``ok`` (None when it is)."""
        damaged = [f"disk {i} has {scan.corrupt} corrupt block{'s' if scan.corrupt > 1 else ''}"
                   for i, scan in enumerate(self.scans) if scan.corrupt]  # fmt: skip
        if damaged:
            return "; ".join(damaged)
        return self.mismatch

    def to_json(self) -> dict[str, object]:
        """The overall figures (as one disk's scan reads), the verdict, and each disk."""
        return {
            "last_seq": self.last_seq,
            "count": sum(scan.count for scan in self.scans),
            "corrupt": self.corrupt,
            "one_instant": self.mismatch is None,
            "verdict": self.verdict,
            "reason": self.reason,
            "disks": [
                {"image": str(image), **scan.to_json()}
                for image, scan in zip(self.images, self.scans, strict=True)
            ],
        }


def read_disk_set(images: Sequence[Path], qemu_img: str = "qemu-img") -> DiskSetScan:
    """Read the records of each of a VM's disks, given in the VM's disk order."""
    if not images:
        raise InvalidInputError("no disk images given: name the VM's disks in order")
    paths = tuple(Path(image) for image in images)
    return DiskSetScan(images=paths, scans=tuple(read_records(p, qemu_img) for p in paths))
