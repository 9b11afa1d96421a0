"""A run outlives a lost Prefect server: the work never needs the server, only the run's record does.

Between stages is where the record needs it: the next stage's start (its concurrency slot) and this
stage's end (its state) go to the server. So each stage, once its work is done and saved, checks that
the server answers; if it does not, it waits for it, up to FASHION_SERVER_WAIT seconds, and the run
goes on, recording its states on the server that came back. Training in the meantime never stops:
progress and logs sent to a lost server are best-effort (tasks/plumbing/progress.py).

A server that does not come back ends the run in one line. In the command's own process that is at
once, with os._exit: past this point every step of Prefect's engine would wait on the lost server
through its client's retries, and end in its tracebacks. Nothing is lost: the stages' outputs and the
training's checkpoints are saved, the same command resumes, and it records this run as crashed
(tasks/plumbing/run_record.py). On a Dask worker it is a permanent failure of that configuration.
"""

from __future__ import annotations

import os
import sys
import time

from fashion_pipeline.tasks.plumbing.failures import PermanentError, program_name
from fashion_pipeline.tasks.plumbing.log import stage_logger

WAIT_ENV = "FASHION_SERVER_WAIT"
DEFAULT_WAIT = 600.0  # seconds: long enough for a server's restart or upgrade
POLL_SECONDS = 2.0


class ServerLost(PermanentError):
    """The Prefect server did not answer within the wait; the work done so far is kept."""


def answers() -> str | None:
    """None when the Prefect server that records this run answers; else why not, in one line.

    Prefect's own client, so its address, key and headers are those the run uses; asked once, without
    the retries with which a run's client, once connected, would wait a minute on a server that is gone.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 0}), get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    return None if problem is None else " ".join(str(problem).split()) or type(problem).__name__


def await_server(stage: str) -> None:
    """Return once the Prefect server answers, waiting for it after `stage` ended; else end the run in one line."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url or (problem := answers()) is None:  # without a URL, Prefect's own temporary server: in this process
        return
    wait = float(os.environ.get(WAIT_ENV) or DEFAULT_WAIT)
    logger = stage_logger()
    logger.warning("The Prefect server at %s does not answer (%s); %s is done and kept, and the run waits up to "
                   "%.0f s for the server before it goes on", url, problem, stage, wait)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        if answers() is None:
            logger.info("The Prefect server at %s answers again; the run goes on", url)
            return
    lost = ServerLost(f"the Prefect server at {url} was lost: no answer for {wait:.0f} s after {stage} ended; "
                      "everything done so far is kept, and the same command resumes once the server is back")
    if _on_dask_worker():
        raise lost
    # Straight to the terminal's stderr, on a line of its own: the flow's log_prints would send a
    # print to Prefect's logger, and a lost server's client may have left a line unfinished there.
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(2, f"\n{program_name()}: error: {lost}\n".encode())
    os._exit(1)


def _on_dask_worker() -> bool:
    if "distributed" not in sys.modules:
        return False
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:
        return False
    return True

