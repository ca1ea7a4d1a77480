#!/usr/bin/env bash
# Ferry's main job end to end on this one machine: installs what it needs,
# brings up a lab of three hosts on loopback (mutual TLS), boots the test guest
# on host-1, replicates it to host-3, live-migrates it between host-1 and
# host-2 (replication follows it) and shows it running. Safe to run again.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bootstrap.sh"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "ferry lab up --hosts 3 --cluster c1   (one etcd on loopback, TLS; every host a node of c1)"
ferry lab up --hosts 3 --cluster c1

step "ferry host list"
ferry host list

if ! ferry vm show demo >/dev/null 2>&1; then
  step "ferry vm create demo --host host-1 --guest test --memory 256M --disk 256M --nic lab"
  ferry vm create demo --host host-1 --guest test --memory 256M --disk 256M --nic lab
fi
if [ "$(ferry vm show demo --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')" != running ]; then
  step "ferry vm start demo"
  ferry vm start demo
fi

step "ferry vm console demo --follow --until 'seq 3'   (the guest boots and writes records)"
ferry vm console demo --follow --until "seq 3" --timeout 120s

field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(d$1)"; }
replicas="$(ferry lab status --json | field '["dir"]')/replicas"
step "ferry replica-server enable --host host-3 --storage $replicas --allow 'host-*'"
ferry replica-server enable --host host-3 --storage "$replicas" --allow 'host-*'
if [ "$(ferry vm show demo --json | field '["replication"]')" = None ]; then
  step "ferry replication enable demo --replica host-3 --frequency 30s   (initial copy while it runs)"
  ferry replication enable demo --replica host-3 --frequency 30s
fi
step "ferry replication sync demo   (a cycle now: only changed blocks travel)"
ferry replication sync demo

where=$(ferry vm show demo --json | field '["host"]')
to=host-2; [ "$where" = host-2 ] && to=host-1
# A peer on the lab network keeps one TCP connection to the guest's echo
# service (port 7) through the move; it never reconnects.
ip=$(ferry vm show demo --json | field '["nics"][0]["ip"]' 2>/dev/null || true)
if [ -n "$ip" ]; then
  step "ferry lab exec -- python -m ferry.testing.echo_peer $ip   (a TCP session from the lab LAN to demo)"
  coproc PEER { ferry lab exec -- "$root/.venv/bin/python" -m ferry.testing.echo_peer "$ip" \
    --connect-timeout 120; }
  peer_pid=$PEER_PID peer_out=${PEER[0]} peer_in=${PEER[1]}
  read -r -t 180 ready <&"$peer_out" || { echo "the echo peer never connected" >&2; exit 1; }
  echo "$ready"
fi
step "ferry vm move demo --to $to   (live migration, shared-nothing: disk and memory move)"
ferry vm move demo --to "$to"
if [ -n "$ip" ]; then
  echo stop >&"$peer_in"
  read -r -t 60 done_line <&"$peer_out" || { echo "the echo peer did not report" >&2; exit 1; }
  wait "$peer_pid" || { echo "the TCP session broke during the move: $done_line" >&2; exit 1; }
  echo "$done_line" | python3 -c "import json,sys; d=json.load(sys.stdin); print('TCP session survived the move: %d/%d lines echoed in order, longest stall %.0f ms' % (d['received'], d['sent'], d['longest_stall_ms']))"
fi

step "ferry vm console demo --follow --until 'seq'   (the same guest run, now on $to)"
ferry vm console demo --follow --until "seq" --timeout 60s

step "ferry replication sync demo   (from $to now: the relationship moved with the VM)"
ferry replication sync demo

step "ferry replication status demo; ferry replication points demo"
ferry replication status demo
ferry replication points demo

ferry failover stop-test demo >/dev/null 2>&1 || true   # a drill an earlier run left
step "ferry failover test demo   (a disaster-recovery drill on host-3: demo-test boots the latest point)"
ferry failover test demo
ferry vm console demo-test --host host-3 --follow --until "up last-seq" --timeout 60s
step "ferry failover stop-test demo"
ferry failover stop-test demo

step "ferry cluster show c1   (nodes, leader, functional level, volume csv1 all nodes see)"
ferry cluster show c1
if ! ferry vm show ha-demo >/dev/null 2>&1; then
  step "ferry vm create ha-demo --cluster c1 --volume csv1 --host host-3 --priority high --guest test"
  ferry vm create ha-demo --cluster c1 --volume csv1 --host host-3 --priority high --guest test \
    --memory 256M --disk 256M
fi
if [ "$(ferry vm show ha-demo --json | field '["host"]')" != host-3 ]; then
  step "ferry vm move ha-demo --to host-3   (inside the cluster: only memory moves, ownership follows)"
  ferry vm move ha-demo --to host-3
fi
if [ "$(ferry vm show ha-demo --json | field '["state"]')" != running ]; then
  step "ferry vm start ha-demo"
  ferry vm start ha-demo
fi
ferry vm console ha-demo --follow --until "seq 3" --timeout 120s >/dev/null
step "ferry lab crash host-3   (power loss: its agent, fence guard and QEMUs SIGKILLed)"
ferry lab crash host-3
step "c1 restarts ha-demo on another node once host-3's lease expires"
start=$SECONDS
while :; do
  now=$(ferry vm show ha-demo --json 2>/dev/null | field '["host"]+" "+d["state"]' 2>/dev/null || true)
  case "$now" in host-3*|"" ) ;; *" running") break ;; esac
  [ $((SECONDS - start)) -lt 120 ] || { echo "ha-demo did not restart within 120 s" >&2; exit 1; }
  sleep 1
done
ferry vm console ha-demo --follow --until "up last-seq" --timeout 60s | grep "up last-seq"
echo "ha-demo runs on ${now% *} again after $((SECONDS - start)) s, its records carried on"
ferry cluster events c1 | tail -n 5
step "ferry lab up --hosts 3 --cluster c1   (host-3 comes back and rejoins; it leaves ha-demo alone)"
ferry lab up --hosts 3 --cluster c1

step "ferry vm list"
ferry vm list

cat <<MSG

The test guest runs on $to and writes a record every 200 ms. Try:
  source scripts/bootstrap.sh           # puts ferry on your PATH
  ferry vm console demo                 # its serial console
  ferry vm stop demo && ferry vm start demo   # it finds its last record again
  ferry vm move demo --to host-1        # and back; --json for scripts
  ferry cluster show c1                 # the cluster; ferry cluster events c1
  ferry cluster drain host-1 --cluster c1   # live-moves its clustered VMs away
  ferry web                             # the web console, in your browser
  ferry job list                        # moves, their phases and results
  ferry replication measure demo        # lag, cycles, delta sizes (--json)
  ferry lab down                        # stop everything
MSG
