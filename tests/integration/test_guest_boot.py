"""The test guest booted in real QEMU (TCG), without any ferry agent.

Proves what later tests lean on: the guest boots, finds its newest record
(after a crash, a wrap-around or a torn write), keeps counting, writes exactly
``encode_record(seq)``, makes a record durable before it prints ``seq N``,
keeps memory dirty when asked, and powers off on an ACPI power button press.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.guest.build import GuestArtifacts, dirty_memory_param, ensure_guest
from ferry.guest.records import (
    DISKS_LINE,
    RECORD_SIZE,
    SEQ_LINE,
    UP_LINE,
    RecordScan,
    encode_record,
    read_disk_set,
    read_records,
    slot_for,
)

pytestmark = pytest.mark.integration

QEMU = shutil.which("qemu-system-x86_64")
QEMU_IMG = shutil.which("qemu-img")


class QmpChannel:
    """Just enough QMP for these tests: commands in, their returns out."""

    def __init__(self, path: Path, timeout: float = 30) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(str(path))
        self._file = self._sock.makefile("rw", encoding="utf-8")
        json.loads(self._file.readline())  # greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: Any) -> Any:
        self._file.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self._file.flush()
        while True:
            reply = json.loads(self._file.readline())
            if "event" in reply:
                continue
            if "error" in reply:
                raise AssertionError(f"QMP {command} failed: {reply['error']}")
            return reply["return"]

    def close(self) -> None:
        self._file.close()
        self._sock.close()


class BootedGuest:
    """One QEMU running the test guest, with its serial log."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path, qmp: Path) -> None:
        self.proc = proc
        self.log = log
        self.qmp_path = qmp
        self.started = time.monotonic()

    def console(self) -> str:
        try:
            return self.log.read_bytes().decode(errors="replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    def lines(self) -> list[str]:
        """Complete console lines (the serial port delivers a line a byte at a time)."""
        return self.console().split("\n")[:-1]

    def seqs(self) -> list[int]:
        return [int(m.group(1)) for ln in self.lines() if (m := SEQ_LINE.match(ln))]

    def wait_for(self, what: str, ready: Callable[[str], bool], timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.console()
            if ready(text):
                return text
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited ({self.proc.returncode}) before {what}:\n{text}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout} s; console:\n{text[-3000:]}")
            time.sleep(0.05)

    def wait_up(self, timeout: float = 60) -> int:
        self.wait_for("up line", lambda _: any(UP_LINE.match(ln) for ln in self.lines()), timeout)
        return next(int(m.group(1)) for ln in self.lines() if (m := UP_LINE.match(ln)))

    def wait_seqs(self, count: int, timeout: float = 60) -> list[int]:
        """Wait until ``count`` seq lines were printed after the up line."""
        self.wait_for(f"{count} seq lines", lambda _: len(self.seqs()) >= count, timeout)
        return self.seqs()

    def qmp(self) -> QmpChannel:
        return QmpChannel(self.qmp_path)

    def kill(self) -> None:
        """SIGKILL, like a host crash: no flush beyond what the guest asked for."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def guest(guest_cache: Path) -> GuestArtifacts:
    """The built guest, from the session's cache (tmp dir or $FERRY_GUEST_CACHE)."""
    if QEMU is None or QEMU_IMG is None:
        pytest.skip("qemu-system-x86_64 / qemu-img not installed")
    return ensure_guest(guest_cache)


@pytest.fixture
def boot(guest: GuestArtifacts, tmp_path: Path) -> Iterator[Callable[..., BootedGuest]]:
    """Start the guest on a disk; every QEMU is killed by pid afterwards."""
    started: list[BootedGuest] = []
    # A short dir: unix socket paths must stay under 108 bytes.
    sockets = Path(tempfile.mkdtemp(prefix="ferry-qmp-"))

    def start(disk: Path, *more: Path, append: str = "") -> BootedGuest:
        n = len(started)
        log = tmp_path / f"serial-{n}.log"
        qmp = sockets / f"{n}.sock"
        assert QEMU is not None
        argv = [
            QEMU, "-nodefaults", "-machine", "q35,accel=tcg", "-cpu", "max", "-m", "256M",
            "-display", "none", "-serial", f"file:{log}",
            "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
            "-append", f"{guest.append} {append}".strip(),
            "-qmp", f"unix:{qmp},server=on,wait=off",
        ]  # fmt: skip
        for i, image in enumerate((disk, *more)):
            argv += ["-blockdev", f"driver=file,filename={image},node-name=file{i}",
                     "-blockdev", f"driver=qcow2,file=file{i},node-name=disk{i}",
                     "-device", f"virtio-blk-pci,drive=disk{i},id=vblk{i}"]  # fmt: skip
        with (tmp_path / f"qemu-{n}.err").open("wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        booted = BootedGuest(proc, log, qmp)
        started.append(booted)
        return booted

    try:
        yield start
    finally:
        for booted in started:
            booted.kill()
        shutil.rmtree(sockets, ignore_errors=True)


def qcow2(path: Path, size: int) -> Path:
    assert QEMU_IMG is not None
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    return path


def raw_block(image: Path, slot: int, tmp_path: Path) -> bytes:
    assert QEMU_IMG is not None
    raw = tmp_path / "copy.raw"
    subprocess.run([QEMU_IMG, "convert", "-U", "-O", "raw", str(image), str(raw)], check=True)
    with raw.open("rb") as f:
        f.seek(slot * RECORD_SIZE)
        return f.read(RECORD_SIZE)


def test_guest_counts_durably_and_resumes_after_a_crash(
    boot: Callable[..., BootedGuest], tmp_path: Path, record_property: Any
) -> None:
    disk = qcow2(tmp_path / "disk.qcow2", 64 * 1024**2)
    first = boot(disk)
    assert first.wait_up() == 0
    boot_seconds = time.monotonic() - first.started
    record_property("boot_seconds", round(boot_seconds, 2))
    print(f"test guest up after {boot_seconds:.2f} s")
    first.wait_seqs(2)
    first.kill()
    printed = first.seqs()
    assert printed == list(range(1, len(printed) + 1))
    # The guest prints nothing but its own lines (quiet kernel).
    assert [ln for ln in first.lines() if ln.strip()] == [
        "ferry-guest up last-seq=0",
        *(f"seq {n}" for n in printed),
    ]

    scan = read_records(disk)
    # Records are durable before "seq N" is printed; one more may have landed.
    assert scan.corrupt == 0
    assert printed[-1] <= scan.last_seq <= printed[-1] + 1
    assert scan.count == scan.last_seq
    # read_records verified every record against encode_record; check one by hand.
    assert raw_block(disk, slot_for(1, 64 * 1024**2 // RECORD_SIZE), tmp_path) == encode_record(1)

    second = boot(disk)
    assert second.wait_up() == scan.last_seq
    assert second.wait_seqs(1)[0] == scan.last_seq + 1


def test_guest_wraps_around_a_small_disk(boot: Callable[..., BootedGuest], tmp_path: Path) -> None:
    slots = 8
    disk = qcow2(tmp_path / "small.qcow2", slots * RECORD_SIZE)
    first = boot(disk)
    assert first.wait_up() == 0
    first.wait_seqs(slots + 3)
    first.kill()
    printed = first.seqs()
    scan = read_records(disk)
    assert scan.corrupt == 0 and scan.count == slots
    assert printed[-1] <= scan.last_seq <= printed[-1] + 1

    second = boot(disk)
    assert second.wait_up() == scan.last_seq
    assert second.wait_seqs(1)[0] == scan.last_seq + 1


def _torn(new: int, old: int) -> bytes:
    """Only the first sector of record ``new`` landed over record ``old``."""
    return encode_record(new)[:512] + encode_record(old)[512:]


# Disks of 8 slots as a crash could leave them: {slot: block}, and the newest seq.
CRAFTED: dict[str, tuple[dict[int, bytes], int]] = {
    "first-lap": ({s: encode_record(s + 1) for s in range(5)}, 5),
    "wrapped": ({slot_for(q, 8): encode_record(q) for q in range(1, 21)}, 20),
    "torn-at-wrap": ({0: _torn(17, 9)} | {s: encode_record(s + 9) for s in range(1, 8)}, 16),
    "torn-mid-lap": (
        {slot_for(q, 8): encode_record(q) for q in range(1, 20)} | {3: _torn(20, 12)},
        19,
    ),
    "foreign": ({s: bytes([0x5A]) * RECORD_SIZE for s in range(8)}, 0),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_guest_finds_the_newest_record(
    case: str, boot: Callable[..., BootedGuest], tmp_path: Path
) -> None:
    blocks, newest = CRAFTED[case]
    raw = tmp_path / "crafted.raw"
    with raw.open("wb") as f:
        f.truncate(8 * RECORD_SIZE)
        for slot, block in blocks.items():
            f.seek(slot * RECORD_SIZE)
            f.write(block)
    assert read_records(raw).last_seq == newest
    disk = tmp_path / "crafted.qcow2"
    assert QEMU_IMG is not None
    subprocess.run([QEMU_IMG, "convert", "-q", "-O", "qcow2", str(raw), str(disk)], check=True)

    guest = boot(disk)
    assert guest.wait_up() == newest
    assert guest.wait_seqs(1)[0] == newest + 1
    guest.kill()
    scan = read_records(disk)
    # The next write lands where a torn block was and repairs it.
    assert scan.corrupt == 0
    assert scan.last_seq >= newest + 1


def crafted_disk(path: Path, slots: int, seqs: range) -> Path:
    """A qcow2 disk of ``slots`` slots holding records ``seqs`` where the guest puts them."""
    raw = path.with_suffix(".raw")
    with raw.open("wb") as f:
        f.truncate(slots * RECORD_SIZE)
        for seq in seqs:
            f.seek(slot_for(seq, slots) * RECORD_SIZE)
            f.write(encode_record(seq))
    assert QEMU_IMG is not None
    subprocess.run([QEMU_IMG, "convert", "-q", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()
    return path


def disks_line(guest: BootedGuest) -> str:
    (found,) = [m.group(1) for ln in guest.lines() if (m := DISKS_LINE.match(ln))]
    return found.strip()


def test_guest_writes_every_disk_and_finishes_a_round_cut_short(
    boot: Callable[..., BootedGuest], tmp_path: Path
) -> None:
    # A copy cut while record 20 had reached vda and vdb but not vdc (8 slots,
    # wrapped), and an empty disk added afterwards.
    disks = [
        crafted_disk(tmp_path / "a.qcow2", 256, range(1, 21)),
        crafted_disk(tmp_path / "b.qcow2", 128, range(1, 21)),
        crafted_disk(tmp_path / "c.qcow2", 8, range(1, 20)),
        qcow2(tmp_path / "d.qcow2", 64 * RECORD_SIZE),
    ]
    first = boot(*disks)
    assert first.wait_up() == 20
    assert disks_line(first) == "vda=20 vdb=20 vdc=19 vdd=0"
    assert first.wait_seqs(3)[0] == 21
    first.kill()
    found = read_disk_set(disks)
    a, b, c, d = found.scans
    assert found.corrupt == 0 and found.mismatch is None, found.reason
    assert a.count == a.last_seq and b.count == b.last_seq  # record 20 too: vdc got it
    assert c.count == 8 and d.count == d.last_seq - 20  # vdd joined at 21
    assert first.seqs()[-1] <= found.last_seq <= first.seqs()[-1] + 1

    # The next boot sees every disk at the newest record, or one behind when
    # the kill cut a round (and finishes that round first).
    second = boot(*disks)
    assert second.wait_up() == found.last_seq
    assert disks_line(second) == " ".join(
        f"vd{'abcd'[i]}={s.last_seq}" for i, s in enumerate(found.scans)
    )
    assert second.wait_seqs(1)[0] == found.last_seq + 1
    second.kill()
    again = read_disk_set(disks)
    assert again.corrupt == 0 and again.mismatch is None, again.reason
    assert again.scans[3].count == again.scans[3].last_seq - 20  # no new gap on vdd


def test_guest_dirties_memory_and_keeps_counting(
    boot: Callable[..., BootedGuest], tmp_path: Path, record_property: Any
) -> None:
    disk = qcow2(tmp_path / "disk.qcow2", 64 * 1024**2)
    guest = boot(disk, append=dirty_memory_param(128 * 1024**2))
    assert guest.wait_up() == 0
    guest.wait_seqs(2)
    qmp = guest.qmp()
    try:
        # Page sampling: the rate counts pages whose *content* changed. The
        # guest first builds its 1 MiB chunk, which on a loaded host can fill
        # a whole 1 s window, so the best of a few windows is what it can do.
        for _ in range(5):
            qmp.execute("calc-dirty-rate", **{"calc-time": 1})
            deadline = time.monotonic() + 30
            while (result := qmp.execute("query-dirty-rate"))["status"] != "measured":
                assert time.monotonic() < deadline, f"dirty rate never measured: {result}"
                time.sleep(0.2)
            if result["dirty-rate"] >= 16:
                break
    finally:
        qmp.close()
    record_property("dirty_rate_mb_s", result["dirty-rate"])
    assert result["dirty-rate"] >= 16, f"guest dirties too little memory: {result}"
    before = guest.seqs()[-1]
    printed = guest.wait_seqs(len(guest.seqs()) + 5, timeout=30)
    assert printed[-1] >= before + 5
    guest.kill()
    scan = read_records(disk)
    assert scan.corrupt == 0 and scan.last_seq >= printed[-1]


def test_power_button_powers_the_guest_off(
    boot: Callable[..., BootedGuest], tmp_path: Path
) -> None:
    disk = qcow2(tmp_path / "disk.qcow2", 64 * 1024**2)
    guest = boot(disk)
    assert guest.wait_up() == 0
    guest.wait_seqs(1)
    qmp = guest.qmp()
    try:
        qmp.execute("system_powerdown")
    finally:
        qmp.close()
    assert guest.proc.wait(timeout=30) == 0
    assert "ferry-guest powerdown" in guest.console()
    scan = read_records(disk)
    assert scan.corrupt == 0 and scan.last_seq >= guest.seqs()[-1]


def test_records_scan_of_a_running_guest_is_consistent(
    boot: Callable[..., BootedGuest], tmp_path: Path
) -> None:
    # qemu-img -U reads the image while the guest writes: a snapshot in time.
    disk = qcow2(tmp_path / "disk.qcow2", 64 * 1024**2)
    guest = boot(disk)
    guest.wait_up()
    printed = guest.wait_seqs(3)
    scan = read_records(disk)
    assert isinstance(scan, RecordScan)
    assert scan.last_seq >= printed[-1] and scan.count == scan.last_seq
