"""Prefect's lock manager protocol over flock(2), for SERIALIZABLE stages: no lock outlives its holder.

Prefect's FileSystemLockManager marks a lock by a file that its holder deletes; a run killed by
SIGKILL leaves it behind, and every later run waits on it. A flock(2) lock belongs to an open file,
which the kernel closes, and so releases, when the process ends however it ends.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio.to_thread
from prefect.locking.protocol import LockManager

from fashion_pipeline.tasks.plumbing.flocks import try_lock

POLL_SECONDS = 0.1


class FlockLockManager(LockManager):
    """One lock file per cache key in `<PREFECT_HOME>/locks`, the home whose result records the locks guard."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[str, int]] = {}  # key -> (holder, descriptor) of the locks this process holds

    def _path(self, key: str) -> Path:
        from prefect.settings import PREFECT_HOME

        folder = Path(PREFECT_HOME.value()) / "locks"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{key}.lock"

    def _try(self, key: str, holder: str) -> bool:
        descriptor = os.open(self._path(key), os.O_RDWR | os.O_CREAT, 0o666)
        if not try_lock(descriptor):
            os.close(descriptor)
            return False
        self._held[key] = (holder, descriptor)
        return True

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        """Wait for the lock (at most `acquire_timeout` s); `hold_timeout` is moot: the lock dies with its holder."""
        if self.is_lock_holder(key, holder):
            return True
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while not self._try(key, holder):
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(POLL_SECONDS)
        return True

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        return await anyio.to_thread.run_sync(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        if not self.is_lock_holder(key, holder):
            raise ValueError(f"No lock held by {holder} for transaction with key {key}")
        _, descriptor = self._held.pop(key)
        os.close(descriptor)  # closing the descriptor releases the lock

    def is_locked(self, key: str) -> bool:
        if key in self._held:
            return True
        descriptor = os.open(self._path(key), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            return not try_lock(descriptor, shared=True)
        finally:
            os.close(descriptor)

    def is_lock_holder(self, key: str, holder: str) -> bool:
        return self._held.get(key, (None, -1))[0] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(POLL_SECONDS)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await anyio.to_thread.run_sync(self.wait_for_lock, key, timeout)
