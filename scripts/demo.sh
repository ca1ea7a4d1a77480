#!/usr/bin/env bash
# Ferry's main job end to end on this one machine: installs what it needs,
# brings up a lab of two hosts on loopback (mutual TLS), boots the test guest
# on host-1 and shows it running. Safe to run again.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bootstrap.sh"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "ferry lab up --hosts 2"
ferry lab up --hosts 2

step "ferry host list"
ferry host list

if ! ferry vm show demo >/dev/null 2>&1; then
  step "ferry vm create demo --host host-1 --guest test --memory 256M --disk 256M"
  ferry vm create demo --host host-1 --guest test --memory 256M --disk 256M
fi
if [ "$(ferry vm show demo --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')" != running ]; then
  step "ferry vm start demo"
  ferry vm start demo
fi

step "ferry vm console demo --follow --until 'seq 3'   (the guest boots and writes records)"
ferry vm console demo --follow --until "seq 3" --timeout 120s

where=$(ferry vm show demo --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["host"])')
to=host-2; [ "$where" = host-2 ] && to=host-1
step "ferry vm move demo --to $to   (live migration, shared-nothing: disk and memory move)"
ferry vm move demo --to "$to"

step "ferry vm console demo --follow --until 'seq'   (the same guest run, now on $to)"
ferry vm console demo --follow --until "seq" --timeout 60s

step "ferry vm list"
ferry vm list

cat <<MSG

The test guest runs on $to and writes a record every 200 ms. Try:
  source scripts/bootstrap.sh           # puts ferry on your PATH
  ferry vm console demo                 # its serial console
  ferry vm stop demo && ferry vm start demo   # it finds its last record again
  ferry vm move demo --to host-1        # and back; --json for scripts
  ferry job list                        # moves, their phases and results
  ferry lab down                        # stop everything
MSG
