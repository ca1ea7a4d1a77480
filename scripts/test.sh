#!/usr/bin/env bash
# Runs ferry's whole test suite (unit + integration with real QEMU), after
# installing what it needs. Extra arguments go to pytest. Two workers, a test
# module each (every module has its own lab): most of an integration test is
# waiting for a guest or an agent, so two run side by side on two cores.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bootstrap.sh"
cd "$root"
exec python -m pytest -q -n 2 --dist loadfile --durations=20 "$@"
