"""One run at a time per experiment: an exclusive lock on the run directory."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class ExperimentBusyError(RuntimeError):
    """Another run holds the experiment's lock."""


_held: set[Path] = set()  # run directories this process has locked: taking one again is a no-op


@contextmanager
def experiment_lock(run_dir: Path) -> Iterator[None]:
    """Hold `<run_dir>/.lock` for the duration; refuse at once if another process holds it.

    The operating system drops the lock when its holder exits, even on SIGKILL, so no stale lock
    survives. Within one process the lock nests (the command line and the flow both take it).

    Args:
        run_dir: the experiment's run directory (created if missing).
    """
    key = Path(run_dir).resolve()
    if key in _held:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ExperimentBusyError(
                f"experiment {run_dir} is in use by another run (pid {holder}); wait for it or choose another --experiment"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        _held.add(key)
        try:
            yield
        finally:
            _held.discard(key)
            fcntl.flock(handle, fcntl.LOCK_UN)
