"""One logger for the stages: Prefect's run logger inside a run, the standard library's outside."""

from __future__ import annotations

import logging

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    """The current Prefect run's logger, or the `fashion` logger when called without Prefect."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("fashion")
