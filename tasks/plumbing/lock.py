"""One run at a time per experiment: an exclusive lock on the run directory (and a lease, in a store)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from fashion_pipeline.tasks.plumbing import storage
from fashion_pipeline.tasks.plumbing.failures import PermanentError
from fashion_pipeline.tasks.plumbing.files import made_folder
from fashion_pipeline.tasks.plumbing.flocks import try_lock


class ExperimentBusyError(PermanentError):
    """Another run holds the experiment's lock."""


_held: set[Path] = set()  # run directories this process has locked: taking one again is a no-op


@contextmanager
def experiment_lock(location: str | Path) -> Iterator[None]:
    """Hold `<run_dir>/.lock` for the duration; refuse at once if another process holds it.

    The operating system drops the lock when its holder exits, even on SIGKILL, so no stale lock
    survives. Within one process the lock nests (the command line and the flow both take it). A run
    that leaves nothing in the run directory (refused, or failed before its first output) removes
    the lock file and the folders it created for it. A run directory in a store is locked in its
    local mirror, against runs on this machine, and by a lease in the store, against runs on others.

    Args:
        location: the experiment's run directory (created if missing): a path, or a URL in a store.
    """
    run_dir = storage.local_path(location)
    key = run_dir.resolve()
    if key in _held:
        yield
        return
    with made_folder(run_dir):
        lock_path = Path(run_dir) / ".lock"
        handle = _locked(lock_path)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            _held.add(key)
            try:
                with _store_lease(run_dir, location):
                    yield
            finally:
                _held.discard(key)
                if [path.name for path in Path(run_dir).iterdir()] == [".lock"]:
                    # While still locked: a run that opened it meanwhile sees it gone, and retries.
                    lock_path.unlink()
        finally:
            handle.close()  # releases the lock


@contextmanager
def _store_lease(run_dir: Path, location: str | Path) -> Iterator[None]:
    """The store's lease on a run directory in a store (tasks/plumbing/storage.py); nothing for a local one."""

    def holder(record: dict) -> str:
        left = max(0, round(record.get("expires", 0) - time.time()))
        return (f"experiment {location} is in use by another run (host {record.get('host')}, pid {record.get('pid')}; "
                f"its lease expires in {left} s unless renewed); wait for it or choose another --experiment")

    try:
        with storage.lease(run_dir, holder):
            yield
    except storage.LeaseHeld as error:
        raise ExperimentBusyError(str(error)) from None


def _locked(lock_path: Path) -> IO[str]:
    """The lock file, opened and exclusively locked; ExperimentBusyError if another run holds it."""
    while True:
        lock_path.parent.mkdir(parents=True, exist_ok=True)  # gone if its last run just removed it
        try:
            handle = open(lock_path, "a+")  # noqa: SIM115  (closed by experiment_lock)
        except FileNotFoundError:  # ... between the mkdir and the open
            continue
        if not try_lock(handle):
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise ExperimentBusyError(
                f"experiment {lock_path.parent} is in use by another run (pid {holder}); wait for it or choose "
                "another --experiment"
            ) from None
        try:
            if os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino:
                return handle
        except FileNotFoundError:
            pass
        handle.close()  # its holder removed the file after we opened it: lock the one there now
