"""The deployment in prefect.yaml, seen from Python: its schedule for `fashion.py --serve`, and its pull step.

prefect.yaml is the one place the schedule is written; `--serve` reads it from there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from prefect import Flow
from prefect.deployments.steps import set_working_directory
from prefect.schedules import Cron

REPOSITORY = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPOSITORY / "prefect.yaml"
DEPLOYMENT = "nightly"


def deployment_spec(name: str = DEPLOYMENT, prefect_file: Path = PREFECT_FILE) -> dict[str, Any]:
    """The deployment called `name` in `prefect_file`, as written there."""
    if not prefect_file.is_file():
        raise FileNotFoundError(f"{prefect_file} not found: install the project from its clone (pip install -e .)")
    deployments = yaml.safe_load(prefect_file.read_text())["deployments"]
    matches = [spec for spec in deployments if spec["name"] == name]
    if len(matches) != 1:
        raise LookupError(f"{prefect_file} has {len(matches)} deployments named {name!r}, expected one")
    return matches[0]


def deployment_schedule(name: str = DEPLOYMENT, prefect_file: Path = PREFECT_FILE) -> Cron:
    """The deployment's (single) cron schedule, with its time zone."""
    schedules = deployment_spec(name, prefect_file)["schedules"]
    if len(schedules) != 1 or "cron" not in schedules[0]:
        raise LookupError(f"deployment {name!r} in {prefect_file} should have exactly one cron schedule")
    return Cron(schedules[0]["cron"], timezone=schedules[0].get("timezone"))


def serve_on_schedule(flow: Flow, parameters: dict[str, Any]) -> None:
    """Serve `flow` from this process on the deployment's schedule, one run at a time, until interrupted.

    The served deployment is `<flow>/<deployment>-serve`, beside (not over) the work-pool deployment.
    """
    flow.serve(
        name=f"{DEPLOYMENT}-serve", schedule=deployment_schedule(), parameters=parameters,
        global_limit=deployment_spec().get("concurrency_limit"),
    )


def enter_repository() -> dict[str, str]:
    """Pull step: make the clone that this Python environment imports `fashion_pipeline` from the working directory.

    It is found at run time on the worker, so no path of the deploying machine is stored in the
    deployment, and the worker may be started from any folder. A copy installed in site-packages
    has no prefect.yaml beside it, and is refused: a run from there would write into site-packages.
    """
    if not PREFECT_FILE.is_file():
        raise FileNotFoundError(f"{REPOSITORY} holds no prefect.yaml: the worker imports an installed copy of the "
                                "project; install it from its clone there (pip install -e .)")
    return set_working_directory(str(REPOSITORY))
