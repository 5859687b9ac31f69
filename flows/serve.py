"""Serve the deployments `edgesam/full`, `edgesam-nightly/nightly` (02:00 daily, UTC),
`edgesam-ablations/default` and `edgesam-sweep/default`.

    prefect server start --host 127.0.0.1          # in one terminal
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve
"""

from __future__ import annotations

from prefect import serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron

from flows.ablations import edgesam_ablations
from flows.nightly import edgesam_nightly
from flows.pipeline import edgesam
from flows.sweep import edgesam_sweep

NIGHTLY_CRON = "0 2 * * *"
NIGHTLY_TIMEZONE = "UTC"
NIGHTLY_PARAMETERS = {"profile": "default", "latest_export": True}


def deployments() -> list[RunnerDeployment]:
    return [
        edgesam.to_deployment(
            name="full",
            description="The whole DAG; every parameter of the flow may be set per run.",
            tags=["edgesam"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        ),
        edgesam_nightly.to_deployment(
            name="nightly",
            description="Every aliased model of the registry and the profile's latest export, evaluated on a "
                        "fixed benchmark unless the ledger has the result; fails on a regression (docs/NIGHTLY.md).",
            schedules=[Cron(NIGHTLY_CRON, timezone=NIGHTLY_TIMEZONE)],
            parameters=NIGHTLY_PARAMETERS,
            tags=["edgesam", "nightly"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        ),
        edgesam_ablations.to_deployment(
            name="default",
            description="The paper's phase-2 ablations: prompt_kd reruns from the cached upstream, one table.",
            tags=["edgesam", "ablations"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        ),
        edgesam_sweep.to_deployment(
            name="default",
            description="Student backbones distilled from one teacher through the whole DAG, one leaderboard.",
            tags=["edgesam", "sweep"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        ),
    ]


def main() -> None:
    serve(*deployments(), limit=1)  # one run at a time: runs share the artifact store


if __name__ == "__main__":
    main()
