"""One logger for the stages and the ML code: Prefect's run logger inside a run, the standard library's outside."""

from __future__ import annotations

import logging
import sys


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    """The current Prefect run's logger, or the `fashion` logger when called outside one (or without Prefect)."""
    run = prefect_run_context()
    if run is None:
        return logging.getLogger("fashion")
    from prefect.logging import get_run_logger

    return get_run_logger(run)


def prefect_run_context() -> object | None:
    """The Prefect task run's context this code runs in, else None.

    Prefect is consulted only when it is loaded: a process that never imported it is in no Prefect
    run, and the ML code that logs stays importable and runnable without it.
    """
    if "prefect" not in sys.modules:
        return None
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() or FlowRunContext.get()
