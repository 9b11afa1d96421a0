"""flock(2) locks: the one lock primitive of the experiment lock, Prefect's cache locks and the local server.

A flock belongs to an open file and dies with its process, SIGKILL included, so no lock outlives its
holder. Not the `filelock` package: the local server's lease is shared by every run that uses the
server (LOCK_SH) and taken exclusively by the server once idle, and filelock has exclusive locks only.
"""

from __future__ import annotations

import fcntl
from typing import IO

from fashion_pipeline.tasks.plumbing.polling import wait_for

Lockable = IO[str] | int  # an open file, or its descriptor


def try_lock(file: Lockable, shared: bool = False) -> bool:
    """Lock `file` (shared, or exclusively) if no other holder prevents it; whether it is now locked."""
    try:
        fcntl.flock(file, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def lock(file: Lockable, shared: bool = False) -> None:
    """Lock `file`, waiting as long as it takes."""
    fcntl.flock(file, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)


def lock_within(file: Lockable, what: str, timeout: float, shared: bool = False) -> None:
    """Lock `file`, waiting at most `timeout` seconds for `what`; TimeoutError, naming it, after that."""
    wait_for(lambda: try_lock(file, shared), what, timeout, interval=0.05)


def unlock(file: Lockable) -> None:
    fcntl.flock(file, fcntl.LOCK_UN)
