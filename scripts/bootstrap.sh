#!/usr/bin/env bash
# Installs what ferry needs on this machine, once: Debian packages (QEMU, the
# test guest's kernel and busybox) and a Python venv with ferry in it.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# chromium (and a font for its screenshots) drives the web console's browser tests.
# etcd-server: the lab's cluster store and the etcd integration tests.
# qemu-guest-agent: qemu-ga and its libraries go into the test guest; e2fsprogs
# makes and reads the guest-agent test's file system (mke2fs, debugfs).
# prometheus: promtool checks the agents' /metrics output in the tests.
# ovmf: --firmware uefi; mtools and syslinux build bootable test disks without loop devices.
debs=(qemu-system-x86 qemu-utils linux-image-cloud-amd64 busybox-static zstd iproute2 rsync
      chromium fonts-liberation etcd-server ovmf mtools syslinux syslinux-common
      qemu-guest-agent e2fsprogs prometheus)
missing=()
for pkg in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "ferry: installing Debian packages: ${missing[*]}" >&2
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -q >&2
  "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
if [ ! -x "$root/.venv/bin/ferry" ] || [ "$root/pyproject.toml" -nt "$root/.venv/.ferry-installed" ]; then
  echo "ferry: preparing the Python venv in $root/.venv" >&2
  python3 -m venv "$root/.venv"
  "$root/.venv/bin/pip" install -q --upgrade pip >&2
  "$root/.venv/bin/pip" install -q -e "$root[dev]" >&2
  touch "$root/.venv/.ferry-installed"
fi
export PATH="$root/.venv/bin:$PATH"
