"""The flock(2) lock manager of SERIALIZABLE stages: exclusive across processes, gone with a killed holder."""

from __future__ import annotations

import signal
import subprocess
import sys

import anyio
import pytest

from fashion_pipeline.tasks.plumbing.cache_locks import FlockLockManager

HOLD = ("import sys, time; from fashion_pipeline.tasks.plumbing.cache_locks import FlockLockManager\n"
        "assert FlockLockManager().acquire_lock(sys.argv[1], 'other'); print('held', flush=True); time.sleep(120)")


def test_lock_is_exclusive_and_dies_with_a_killed_holder() -> None:
    locks = FlockLockManager()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, "download-key"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert locks.is_locked("download-key")
        assert not locks.acquire_lock("download-key", "me", acquire_timeout=0.3)
        holder.send_signal(signal.SIGKILL)  # no chance to release it
        holder.wait(timeout=10)
        assert locks.wait_for_lock("download-key", timeout=5)
        assert anyio.run(locks.aacquire_lock, "download-key", "me")
        assert locks.is_lock_holder("download-key", "me") and not locks.is_lock_holder("download-key", "other")
        with pytest.raises(ValueError, match="No lock held by other"):
            locks.release_lock("download-key", "other")
        locks.release_lock("download-key", "me")
        assert not locks.is_locked("download-key")
    finally:
        holder.kill()
        holder.wait()
