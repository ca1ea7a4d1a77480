#!/usr/bin/env bash
# Runs ferry's whole test suite (unit + integration with real QEMU), after
# installing what it needs. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bootstrap.sh"
cd "$root"
exec python -m pytest -q --durations=20 "$@"
