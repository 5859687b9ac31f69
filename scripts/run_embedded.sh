#!/usr/bin/env bash
# The one command: set up .venv on a fresh checkout and run the full EdgeSAM flow on the
# embedded default (profile `default`; about 30 minutes on 2 CPU cores, seconds when cached).
# Extra arguments go to `python -m flows.run_local`, e.g. --profile smoke, --set KEY=VALUE.
set -euo pipefail
. "$(dirname "$0")/setup_venv.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
# Idle OpenMP threads sleep instead of spinning: spinning threads beside any other busy process
# (a Ray actor, the Prefect server) slowed a 2-thread step 5-10x on these 2 cores.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# glibc malloc: keep freed tensors instead of returning them to the OS at every step (measured
# in the teacher's training: system CPU time 33% -> 8%, 1.0 -> 1.3 images/s; Ray workers inherit it).
export MALLOC_MMAP_MAX_="${MALLOC_MMAP_MAX_:-0}" MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-68719476736}"
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
exec python -m flows.run_local "$@"
