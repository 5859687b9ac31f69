#!/usr/bin/env bash
# Set up .venv on a fresh checkout and run the tests (arguments go to pytest; default: all).
set -euo pipefail
. "$(dirname "$0")/setup_venv.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest "$@"
