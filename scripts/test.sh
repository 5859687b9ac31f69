#!/usr/bin/env bash
# Set up .venv on a fresh checkout and run the tests (arguments go to pytest; default: all).
set -euo pipefail
. "$(dirname "$0")/setup_venv.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# library logs outside a flow run stay local instead of warning that no flow run takes them
export PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW="${PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW:-ignore}"
exec python -m pytest "$@"
