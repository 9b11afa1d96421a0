"""A run whose Prefect server (a real `prefect server start`, as a remote one) is killed mid-training:
the run waits for it after the stage and records everything on its return; a server that stays away
ends the run in one line, and the rerun resumes and records the lost run as crashed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fashion_pipeline.tasks.plumbing.server_watch import WAIT_ENV
from tests.helpers import FLOW_SCRIPT, TASK_RUNS, final_weights, same_weights, tiny_args, wait_while_running
from tests.prefect_server import PrefectServer

pytestmark = pytest.mark.slow


def start_run(args: list[str], env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen, Path]:
    """The flow script in `cwd`; its stderr goes to a file, read while it runs."""
    stderr = cwd / "stderr.txt"
    with open(stderr, "w") as output:
        process = subprocess.Popen([sys.executable, str(FLOW_SCRIPT), *args], cwd=cwd, env=env,
                                   stdout=subprocess.PIPE, stderr=output, text=True)
    return process, stderr


def first_checkpoint(cwd: Path, step: int) -> list[Path]:
    return list((cwd / "runs").glob(f"*/train-*/checkpoints/step-{step:08d}.pt"))


def test_a_run_waits_for_its_server_and_records_everything_on_its_return(
        long_training: tuple[Path, dict, dict], tmp_path: Path) -> None:
    mirror, settings, reference = long_training
    server = PrefectServer(tmp_path / "server").start()
    cwd = tmp_path / "run"
    cwd.mkdir()
    process, stderr = start_run([*tiny_args(**settings), "--mirror", str(mirror)], server.env, cwd)
    try:
        wait_while_running(process, lambda: first_checkpoint(cwd, 300), "the checkpoint at step 300", 120, 0.01)
        server.kill()
        # Training goes on without it; the run waits for it once the training is done and saved.
        wait_while_running(process, lambda: "does not answer" in stderr.read_text(), "the run waiting", 300, 0.2)
        server.start()
        process.wait(timeout=300)
        log = stderr.read_text()
        assert process.returncode == 0, log[-3000:]
        assert "Traceback" not in log and "| ERROR" not in log and "Error logging to API" not in log, log[-3000:]
        assert "train is done and kept, and the run waits up to 600 s for the server" in log
        train_dir = next((cwd / "runs").glob("*/train-*"))
        assert same_weights(torch.load(train_dir / "model.pt", weights_only=True)["model"], final_weights(reference))
        # The server that came back has the whole record: the run and every task run of it ended.
        assert [run["state_type"] for run in server.records("flow_runs")] == ["COMPLETED"]
        task_runs = server.records("task_runs")
        assert len(task_runs) == TASK_RUNS and {run["state_type"] for run in task_runs} == {"COMPLETED"}
    finally:
        if process.poll() is None:
            process.kill()
        server.stop()


def test_a_server_that_stays_away_ends_the_run_in_one_line(synthetic_mirror: Path, tmp_path: Path) -> None:
    server = PrefectServer(tmp_path / "server").start()
    cwd = tmp_path / "run"
    cwd.mkdir()
    args = [*tiny_args(epochs=10), "--mirror", str(synthetic_mirror)]
    process, stderr = start_run(args, server.env | {WAIT_ENV: "2"}, cwd)
    try:
        wait_while_running(process, lambda: first_checkpoint(cwd, 15), "the first checkpoint", 120, 0.01)
        server.kill()
        process.wait(timeout=300)
        log = stderr.read_text()
        assert process.returncode == 1, log[-3000:]
        assert log.strip().splitlines()[-1] == (
            f"fashion.py: error: the Prefect server at {server.api_url} was lost: no answer for 2 s after train "
            "ended; everything done so far is kept, and the same command resumes once the server is back")
        assert "Traceback" not in log and "Error logging to API" not in log, log[-3000:]

        trained = {path: path.stat().st_mtime_ns for path in (cwd / "runs").glob("*/train-*/checkpoints/*")}
        server.start()
        rerun = subprocess.run([sys.executable, str(FLOW_SCRIPT), *args], cwd=cwd, env=server.env,
                               capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        # The training the lost run finished is kept, not redone.
        assert trained == {path: path.stat().st_mtime_ns for path in (cwd / "runs").glob("*/train-*/checkpoints/*")}
        # The rerun recorded the lost run as crashed: no run, and no task run, left running for ever.
        lost, finished = sorted(server.records("flow_runs"), key=lambda run: run["created"])
        assert (lost["state_type"], finished["state_type"]) == ("CRASHED", "COMPLETED")
        assert not [run for run in server.records("task_runs") if run["state_type"] in ("RUNNING", "PENDING")]
    finally:
        if process.poll() is None:
            process.kill()
        server.stop()
