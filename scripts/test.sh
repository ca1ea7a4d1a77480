#!/usr/bin/env bash
# Runs ferry's whole test suite (unit + integration with real QEMU), after
# installing what it needs. Extra arguments go to pytest. Two workers, a test
# module each (every module has its own lab): most of an integration test is
# waiting for a guest or an agent, so two run side by side on two cores.
# Modules go out in collection order, which tests/conftest.py makes longest
# first, so the short unit modules at the end even the two workers out
# (xdist before 3.8 always orders them by their number of tests).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/bootstrap.sh"
cd "$root"
order=(--no-loadscope-reorder)
python -c 'import sys, xdist; sys.exit(tuple(map(int, xdist.__version__.split(".")[:2])) < (3, 8))' \
  || order=()
exec python -m pytest -q -n 2 --dist loadfile "${order[@]}" --durations=20 "$@"
