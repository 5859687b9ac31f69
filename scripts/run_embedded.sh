#!/usr/bin/env bash
# The one command: set up .venv on a fresh checkout and run the full EdgeSAM flow on the
# embedded default (profile `default`; about an hour on 2 CPU cores, seconds when cached).
# Extra arguments go to `python -m flows.run_local`, e.g. --profile smoke, --set KEY=VALUE.
set -euo pipefail
. "$(dirname "$0")/setup_venv.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
exec python -m flows.run_local "$@"
