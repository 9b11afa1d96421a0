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


def test_a_nested_stage_commits_and_unlocks_though_its_outer_task_fails(prefect_api_url: str, tmp_path) -> None:
    # A sweep's configuration task runs the stages nested in it (tasks/plumbing/transactions.py).
    from prefect import flow, task
    from prefect.cache_policies import INPUTS

    from fashion_pipeline.tasks.plumbing.transactions import own_transactions

    calls: list[int] = []
    policy = INPUTS.configure(isolation_level="SERIALIZABLE", lock_manager=FlockLockManager())

    @task(cache_policy=policy, persist_result=True, result_storage_key="nested-{parameters[value]}")
    def stage(value: int) -> int:
        calls.append(value)
        return value

    @task
    def configuration(value: int) -> None:
        with own_transactions():
            stage(value)
        raise RuntimeError("a later stage failed")

    @flow
    def sweep() -> tuple[str, str]:
        configuration(7, return_state=True)  # fails, after its stage
        configuration(7, return_state=True)  # would wait forever on a lock left held
        return stage(7, return_state=True).name, stage(8, return_state=True).name

    assert sweep() == ("Cached", "Completed") and calls == [7, 8]
