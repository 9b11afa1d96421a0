"""How a command starts its flow run: tagged with the project's tag, on the configured Prefect server
or else the local one, and recorded there before the command prints its outcome."""

from __future__ import annotations

from collections.abc import Callable

from prefect import tags
from prefect.client.schemas.objects import State

from fashion_pipeline.tasks.plumbing.failures import quiet_known_failures
from fashion_pipeline.tasks.plumbing.local_server import LocalServer, local_server_settings, wait_until_recorded

TAG = "fashion-mnist"  # on every flow run of this project: the command line's, the sweep's, the deployment's


def recorded_run(start: Callable[[], State]) -> tuple[State, LocalServer | None]:
    """A flow run that `start` makes (returning its final state), tagged with TAG, on the configured
    Prefect server or else the local one (which is returned); once that server has recorded its end,
    so that the UI link printed next shows it finished."""
    quiet_known_failures()  # a known failure is its one line, printed after: no traceback in the log too
    with local_server_settings() as server:
        with tags(TAG):
            state = start()
        wait_until_recorded(state.state_details.flow_run_id)
    return state, server
