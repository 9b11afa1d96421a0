"""Which flow run works on a run directory, recorded in it, so that the next run closes the record of one that was killed.

A run killed by SIGKILL (or whose machine died) never tells Prefect it ended: its flow run and its
running task runs would stay `Running` in the UI for ever. The run that next takes the experiment's
lock knows that the recorded one is dead (the lock is free only when its holder is gone), and marks
it `Crashed` in Prefect, with every task run of it that had not ended, before it starts.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fashion_pipeline.tasks.plumbing import storage
from fashion_pipeline.tasks.plumbing.files import atomic_write_json
from fashion_pipeline.tasks.plumbing.log import stage_logger

if TYPE_CHECKING:
    from prefect.client.schemas.objects import TaskRun

RECORD = ".flow-run.json"  # in the run directory while a flow run works on it


@contextmanager
def recorded_flow_run(location: str) -> Iterator[None]:
    """Within a flow run that holds the lock of `location` (a run directory, or a URL in a store):
    close the record of a dead earlier run, then record this one for the block's duration."""
    from prefect.runtime import flow_run

    path = storage.local_path(location) / RECORD
    if storage.is_remote(location) and not storage.fetch(path):  # a run killed on another machine records there
        path.unlink(missing_ok=True)
    current = flow_run.id
    earlier = _read(path)
    if earlier and earlier.get("flow_run_id") != current:
        close_dead_run(earlier)
    if current:
        atomic_write_json(path, {"flow_run_id": current, "pid": os.getpid(), "host": socket.gethostname()})
        storage.publish_files([path])
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        try:
            storage.discard(path)
        except Exception as error:  # noqa: BLE001  (the store unreachable: the next run marks nothing wrongly, as it ended)
            stage_logger().warning("The run record %s stays in the store: %s", RECORD, error)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def close_dead_run(record: dict[str, Any]) -> None:
    """Mark the recorded flow run, and each of its task runs that has not ended, `Crashed`.

    Best effort: Prefect's record is for people to read; a failure to mend it is a warning, and the run goes on.
    """
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    message = (f"The process running it (pid {record.get('pid')} on {record.get('host')}) ended without reporting: "
               "killed, or its machine lost. A later run of the experiment found it so.")
    try:
        with get_client(sync_client=True) as client:
            dead = client.read_flow_run(record["flow_run_id"])
            crashed = crash_unfinished_task_runs(dead.id, lambda _: message)
            if dead.state is None or not dead.state.is_final():
                client.set_flow_run_state(dead.id, Crashed(message=message), force=True)
                stage_logger().info("Marked the earlier flow run %r, which was killed, Crashed (and %d of its task "
                                    "runs)", dead.name, crashed)
    except Exception as error:  # noqa: BLE001  (an unknown run, a server that forgot it: nothing to mend)
        stage_logger().warning("Could not mark the killed earlier run %s Crashed: %s", record.get("flow_run_id"), error)


def crash_unfinished_task_runs(flow_run_id: Any, message: Callable[[TaskRun], str | None]) -> int:
    """Mark each task run of the flow run that has not ended `Crashed`, with the message `message` gives
    it (None: leave that one be); how many were marked."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    # Listed, not "all but the final ones": the filter has no negation (an unknown field is ignored).
    going = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]
    with get_client(sync_client=True) as client:
        unfinished = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=going))),
        )
        crashed = [(task_run, text) for task_run in unfinished if (text := message(task_run)) is not None]
        for task_run, text in crashed:
            client.set_task_run_state(task_run.id, Crashed(message=text), force=True)
    return len(crashed)
