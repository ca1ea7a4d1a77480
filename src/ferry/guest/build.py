"""Build the ferry test guest (a kernel and an initramfs) from Debian packages.

The guest is the kernel of ``linux-image-cloud-amd64`` plus a gzip'ed newc
initramfs written here in pure Python: ``/bin/busybox`` of ``busybox-static``
with its applet links, the virtio-blk modules, and ``init.sh`` as ``/init``.
Builds land in a cache directory keyed on everything that goes into them, so
a new kernel, busybox or an edited ``init.sh`` rebuilds. A build is made in a
temp directory and renamed into place under a lock, so an interrupted build
never looks complete and concurrent builders do not trip over each other.

Over 400 lines because the one concept, a reproducible guest image, needs
the package lookup, the newc writer, the module dependency order and the
cache lock together; none of them has a second user.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import importlib.resources
import json
import logging
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import GuestBuildError, InvalidInputError

log = logging.getLogger(__name__)

KERNEL_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
INSTALL_HINT = f"apt-get install -y {KERNEL_PACKAGE} {BUSYBOX_PACKAGE}"

# Loaded by init.sh in this order (each depends only on earlier ones).
REQUIRED_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
)
# ACPI power button -> busybox acpid -> poweroff; skipped when absent.
OPTIONAL_MODULES = ("evdev", "button")
# A NIC (vm create --nic): virtio_net and what it needs, loaded in this order.
NET_MODULES = ("failover", "net_failover", "virtio_net")
# The guest agent's virtio-serial port (vm create --guest-agent).
AGENT_MODULES = ("virtio_console",)
# efivarfs: under UEFI the guest counts its boots in a UEFI variable (init.sh).
FIRMWARE_MODULES = ("efivarfs",)
# qemu-ga of Debian's qemu-guest-agent, copied with its shared libraries (the
# ldd closure) when the build host has it; init.sh starts it on the port.
QEMU_GA = Path("/usr/sbin/qemu-ga")
AGENT_HINT = "apt-get install -y qemu-guest-agent"

# cryptomgr.notests: the kernel's crypto self-tests cost ~0.5 s of a ~3.5 s
# boot under TCG, and the guest does no cryptography that matters.
# ferry.guest=test (TEST_GUEST_MARK) tells the agent a VM runs this guest, which
# takes its address from its MAC (ferry.core.network.guest_ip_of).
APPEND = "console=ttyS0 quiet loglevel=1 cryptomgr.notests ferry.guest=test"
"""Kernel command line of the guest; add :func:`dirty_memory_param` to it."""

# Bump when the layout of the initramfs changes in a way the inputs do not show.
_BUILD_FORMAT = 1

_POWER_BUTTON_SCRIPT = b"""#!/bin/sh
# Run by busybox acpid on an ACPI power button press (QMP system_powerdown).
echo "ferry-guest powerdown" >/dev/console
sync
poweroff -f
"""

# qemu-ga's guest-shutdown runs /sbin/shutdown, which busybox lacks.
_SHUTDOWN_SCRIPT = b"""#!/bin/sh
# Run by qemu-ga for guest-shutdown (any arguments): a clean poweroff.
echo "ferry-guest agent shutdown" >/dev/console
(sleep 0.2; sync; poweroff -f) >/dev/null 2>&1 &
exit 0
"""

_MANIFEST = "manifest.json"
_KERNEL_NAME = "vmlinuz"
_INITRD_NAME = "initrd.img"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class GuestArtifacts:
    """A built guest: boot it with ``-kernel kernel -initrd initrd -append append``."""

    kernel: Path
    initrd: Path
    append: str


@dataclass(frozen=True)
class GuestInputs:
    """The host files a guest is built from."""

    kernel: Path
    release: str
    modules: dict[str, Path]
    busybox: Path
    init_script: bytes
    # Guest agent files: (path inside the initramfs, file on the host); empty
    # when the host has no qemu-ga.
    agent: tuple[tuple[str, Path], ...] = ()


def default_cache_dir() -> Path:
    """``$FERRY_GUEST_CACHE``, else ``$XDG_CACHE_HOME/ferry/guest`` or ``~/.cache/ferry/guest``."""
    explicit = os.environ.get("FERRY_GUEST_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "ferry" / "guest"


def dirty_memory_param(nbytes: int, *, pause_s: int = 0) -> str:
    """Return the kernel parameters that make the guest keep ``nbytes`` of memory dirty.

    The guest rewrites that much of a tmpfs file (rounded up to whole MiB)
    in a loop, with data that changes on every pass; the memory comes out of
    the guest's RAM, so keep it well under ``-m`` (half is fine). ``pause_s``:
    the guest sleeps that long after each pass, so it dirties at most
    ``nbytes`` per ``pause_s`` seconds (0: as fast as it can).
    """
    if nbytes <= 0:
        raise InvalidInputError(f"memory to dirty must be larger than zero, got {nbytes}")
    if pause_s < 0:
        raise InvalidInputError(f"the pause between passes must be 0 or more, got {pause_s}")
    pause = f" ferry.dirty_pause={pause_s}" if pause_s else ""
    for suffix, scale in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if nbytes % scale == 0:
            return f"ferry.dirty={nbytes // scale}{suffix}{pause}"
    return f"ferry.dirty={nbytes}{pause}"


# --- newc cpio ---------------------------------------------------------------


class NewcArchive:
    """Writes a newc (``070701``) cpio archive, the format initramfs unpacks.

    Each entry is a 110-byte ASCII header (magic + 13 fields as 8 hex digits:
    ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
    rdevmajor, rdevminor, namesize including the NUL, check), the name and a
    NUL padded to 4 bytes, then the data padded to 4 bytes. The archive ends
    with an entry named ``TRAILER!!!``. Names carry no leading ``/``; parent
    directories are added before their children. Owner root, mtime 0, so the
    same inputs give the same bytes.
    """

    def __init__(self) -> None:
        self._out = bytearray()
        self._ino = 0
        self._names: set[str] = set()
        self._finished = False

    def directory(self, name: str, mode: int = 0o755) -> None:
        name = self._clean(name)
        if name not in self._names:
            self._add(name, stat.S_IFDIR | mode, b"", nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._add(self._clean(name), stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._add(self._clean(name), stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._add(self._clean(name), stat.S_IFCHR | mode, b"", rdev=(major, minor))

    def __contains__(self, name: str) -> bool:
        return name.strip("/") in self._names

    def finish(self) -> bytes:
        """Append the trailer and return the archive."""
        if not self._finished:
            self._entry("TRAILER!!!", 0, b"", ino=0, nlink=1, rdev=(0, 0))
            self._finished = True
        return bytes(self._out)

    def _clean(self, name: str) -> str:
        name = name.strip("/")
        if not name or ".." in name.split("/"):
            raise GuestBuildError(f"bad initramfs path {name!r}")
        parent = name.rpartition("/")[0]
        if parent and parent not in self._names:
            self.directory(parent)
        return name

    def _add(
        self, name: str, mode: int, data: bytes, *, nlink: int = 1, rdev: tuple[int, int] = (0, 0)
    ) -> None:
        if self._finished:
            raise GuestBuildError("initramfs archive already finished")
        if name in self._names:
            raise GuestBuildError(f"initramfs path {name!r} added twice")
        self._names.add(name)
        self._ino += 1
        self._entry(name, mode, data, ino=self._ino, nlink=nlink, rdev=rdev)

    def _entry(
        self, name: str, mode: int, data: bytes, *, ino: int, nlink: int, rdev: tuple[int, int]
    ) -> None:
        raw_name = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw_name), 0)
        self._out += b"070701" + "".join(f"{v:08x}" for v in fields).encode() + raw_name
        self._pad()
        self._out += data
        self._pad()

    def _pad(self) -> None:
        self._out += b"\0" * (-len(self._out) % 4)


# --- inputs ------------------------------------------------------------------


def _release_key(release: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", release))


def find_kernel(boot: Path = Path("/boot")) -> tuple[Path, str]:
    """Return the newest ``vmlinuz-*-cloud-amd64`` in ``boot`` and its release."""
    kernels = sorted(
        boot.glob("vmlinuz-*-cloud-amd64"),
        key=lambda p: _release_key(p.name.removeprefix("vmlinuz-")),
    )
    if not kernels:
        raise GuestBuildError(
            f"no kernel of {KERNEL_PACKAGE} in {boot} to build the test guest; run: {INSTALL_HINT}"
        )
    kernel = kernels[-1]
    if not os.access(kernel, os.R_OK):
        raise GuestBuildError(f"cannot read {kernel}: make it readable or build as root")
    return kernel, kernel.name.removeprefix("vmlinuz-")


def find_modules(modules_dir: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """Map module names to their files, as listed in ``modules.dep``."""
    dep = modules_dir / "modules.dep"
    try:
        lines = dep.read_text().splitlines()
    except OSError as exc:
        raise GuestBuildError(
            f"cannot read {dep} ({exc.strerror}); reinstall the kernel modules: {INSTALL_HINT}"
        ) from exc
    found: dict[str, Path] = {}
    for line in lines:
        rel = line.partition(":")[0].strip()
        base = Path(rel).name
        module = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base).replace("-", "_")
        if module in names:
            found[module] = modules_dir / rel
    return found


def _check_static(busybox: Path) -> None:
    """Refuse a dynamically linked busybox: the initramfs has no libc."""
    try:
        with busybox.open("rb") as f:
            ident = f.read(64)
            if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
                raise GuestBuildError(f"{busybox} is not a 64-bit little-endian ELF program")
            phoff = int.from_bytes(ident[32:40], "little")
            phentsize = int.from_bytes(ident[54:56], "little")
            phnum = int.from_bytes(ident[56:58], "little")
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except FileNotFoundError as exc:
        raise GuestBuildError(f"no {busybox} to build the test guest; run: {INSTALL_HINT}") from exc
    except OSError as exc:
        raise GuestBuildError(f"cannot read {busybox}: {exc.strerror}") from exc
    pt_interp = 3
    for i in range(phnum):
        if int.from_bytes(table[i * phentsize : i * phentsize + 4], "little") == pt_interp:
            raise GuestBuildError(
                f"{busybox} is dynamically linked (Debian package busybox); "
                f"the test guest needs the static one: {INSTALL_HINT}"
            )


def find_inputs(
    *,
    boot: Path = Path("/boot"),
    modules_root: Path = Path("/lib/modules"),
    busybox: Path = Path("/bin/busybox"),
) -> GuestInputs:
    """Locate everything the guest is built from, or say what to install."""
    kernel, release = find_kernel(boot)
    wanted = REQUIRED_MODULES + OPTIONAL_MODULES + AGENT_MODULES + NET_MODULES + FIRMWARE_MODULES
    modules = find_modules(modules_root / release, wanted)
    missing = [m for m in REQUIRED_MODULES if m not in modules]
    if missing:
        raise GuestBuildError(
            f"kernel {release} has no module {', '.join(missing)} under "
            f"{modules_root / release}; run: {INSTALL_HINT}"
        )
    _check_static(busybox)
    init_script = importlib.resources.files("ferry.guest").joinpath("init.sh").read_bytes()
    agent = agent_files(QEMU_GA) if QEMU_GA.exists() else ()
    return GuestInputs(kernel, release, modules, busybox, init_script, agent)


def agent_files(program: Path) -> tuple[tuple[str, Path], ...]:
    """``program`` and its shared libraries as ldd resolves them, keyed by path in the guest."""
    try:
        proc = subprocess.run(["ldd", str(program)], capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise GuestBuildError(f"cannot list the libraries of {program} with ldd: {exc}") from exc
    found = [(str(program).lstrip("/"), program)]
    for line in proc.stdout.decode().splitlines():
        # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        words = line.split()
        path = words[2] if len(words) > 2 and words[1] == "=>" else words[0] if words else ""
        if path.startswith("/"):
            found.append((path.lstrip("/"), Path(path)))
    return tuple(found)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_name(inputs: GuestInputs) -> str:
    try:
        key = {
            "format": _BUILD_FORMAT,
            "release": inputs.release,
            "kernel": _sha256_file(inputs.kernel),
            "busybox": _sha256_file(inputs.busybox),
            "modules": {m: _sha256_file(p) for m, p in sorted(inputs.modules.items())},
            "init": hashlib.sha256(inputs.init_script).hexdigest(),
            "agent": {name: _sha256_file(path) for name, path in inputs.agent},
            "shutdown": hashlib.sha256(_SHUTDOWN_SCRIPT).hexdigest(),
            "power_button": hashlib.sha256(_POWER_BUTTON_SCRIPT).hexdigest(),
            "append": APPEND,
        }
    except OSError as exc:
        raise GuestBuildError(
            f"cannot read {exc.filename} to build the test guest: {exc.strerror}"
        ) from exc
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return f"{inputs.release}-{digest[:16]}"


# --- build -------------------------------------------------------------------


def _module_bytes(path: Path) -> bytes:
    """Return a module uncompressed (busybox insmod takes plain ``.ko``)."""
    try:
        if path.name.endswith(".ko.xz"):
            return lzma.decompress(path.read_bytes())
        if path.name.endswith(".ko.gz"):
            return gzip.decompress(path.read_bytes())
        if path.name.endswith(".ko.zst"):
            zstd = shutil.which("zstd")
            if zstd is None:
                raise GuestBuildError(f"{path} is zstd-compressed: apt-get install -y zstd")
            proc = subprocess.run([zstd, "-dcq", str(path)], capture_output=True, check=False)
            if proc.returncode != 0:
                raise GuestBuildError(f"zstd cannot decompress {path}: {proc.stderr.decode()}")
            return proc.stdout
        return path.read_bytes()
    except (OSError, lzma.LZMAError, gzip.BadGzipFile) as exc:
        raise GuestBuildError(f"cannot read kernel module {path}: {exc}") from exc


def _applets(busybox: Path) -> list[str]:
    try:
        proc = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise GuestBuildError(f"cannot list the applets of {busybox}: {exc}") from exc
    return [ln.strip() for ln in proc.stdout.decode().splitlines() if ln.strip()]


def build_initramfs(inputs: GuestInputs) -> bytes:
    """Return the gzip'ed newc initramfs of the guest."""
    archive = NewcArchive()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run"):
        archive.directory(d)
    # The kernel opens /dev/console for init's stdio before devtmpfs exists.
    archive.char_device("dev/console", 5, 1)
    archive.file("init", inputs.init_script, 0o755)
    try:
        archive.file("bin/busybox", inputs.busybox.read_bytes(), 0o755)
    except OSError as exc:
        raise GuestBuildError(f"cannot read {inputs.busybox}: {exc.strerror}") from exc
    for name, path in inputs.agent:
        try:
            archive.file(name, path.read_bytes(), 0o755)
        except OSError as exc:
            raise GuestBuildError(f"cannot read {path}: {exc.strerror}; {AGENT_HINT}") from exc
    if inputs.agent:
        archive.file("sbin/shutdown", _SHUTDOWN_SCRIPT, 0o755)
    for applet in _applets(inputs.busybox):
        if applet.strip("/") not in archive:
            archive.symlink(applet, "/bin/busybox")
    for module, path in inputs.modules.items():
        archive.file(f"lib/modules/{module}.ko", _module_bytes(path))
    if all(m in inputs.modules for m in OPTIONAL_MODULES):
        archive.file("etc/acpi/PWRF/00000080", _POWER_BUTTON_SCRIPT, 0o755)
    return gzip.compress(archive.finish(), compresslevel=6, mtime=0)


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    with (cache_dir / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _artifacts(target: Path) -> GuestArtifacts | None:
    try:
        append = json.loads((target / _MANIFEST).read_text())["append"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(append, str):
        return None
    return GuestArtifacts(kernel=target / _KERNEL_NAME, initrd=target / _INITRD_NAME, append=append)


def _write_build(inputs: GuestInputs, into: Path, progress: Progress) -> None:
    progress(f"copying kernel {inputs.kernel}")
    shutil.copyfile(inputs.kernel, into / _KERNEL_NAME)
    progress(f"building initramfs (busybox, {len(inputs.modules)} modules, init.sh)")
    (into / _INITRD_NAME).write_bytes(build_initramfs(inputs))
    manifest = {
        "release": inputs.release,
        "kernel": str(inputs.kernel),
        "busybox": str(inputs.busybox),
        "modules": sorted(inputs.modules),
        "append": APPEND,
    }
    # Written last: a directory with a manifest is a complete build.
    (into / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def build_guest(
    cache_dir: Path, *, force: bool = False, progress: Progress | None = None
) -> GuestArtifacts:
    """Build the guest into ``cache_dir`` (unless already there and not ``force``)."""
    say = progress or (lambda msg: log.info("%s", msg))
    inputs = find_inputs()
    name = _cache_name(inputs)
    target = cache_dir / name
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with _locked(cache_dir):
            # Whoever held the lock before us may have built it already.
            done = None if force else _artifacts(target)
            if done is not None:
                return done
            # Under the lock no other build runs: leftovers are from crashes.
            for stale in cache_dir.glob(".build-*"):
                _remove(stale)
            tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
            try:
                tmp.chmod(0o755)  # mkdtemp makes it private; the guest is not secret
                _write_build(inputs, tmp, say)
                if target.exists():
                    old = Path(tempfile.mkdtemp(prefix=".build-old-", dir=cache_dir))
                    target.rename(old / name)
                    tmp.rename(target)
                    _remove(old)
                else:
                    tmp.rename(target)
            finally:
                _remove(tmp)
    except OSError as exc:
        raise GuestBuildError(
            f"cannot build the test guest in {cache_dir}: {exc.strerror or exc}"
        ) from exc
    say(f"test guest ready in {target}")
    built = _artifacts(target)
    if built is None:
        raise GuestBuildError(f"the test guest build in {target} has no manifest")
    return built


def ensure_guest(cache_dir: Path, *, progress: Progress | None = None) -> GuestArtifacts:
    """Return the cached guest for the current inputs, building it if needed."""
    ready = _artifacts(cache_dir / _cache_name(find_inputs()))
    if ready is not None:
        return ready
    return build_guest(cache_dir, progress=progress)
