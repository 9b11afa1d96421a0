"""`python flows/fashion.py` as a user runs it: no PREFECT_API_URL, so the run starts its own temporary server."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import psutil
import pytest

from tasks.config import STAGES
from tests.conftest import FLOW_SCRIPT, tiny_args, wait_while_running

SERVER_MARK = "tasks.prefect_server"


def temporary_servers(parent: int) -> list[psutil.Process]:
    """Prefect temporary servers started by process `parent`."""
    try:
        return [child for child in psutil.Process(parent).children() if SERVER_MARK in " ".join(child.cmdline())]
    except psutil.NoSuchProcess:
        return []


@pytest.fixture
def user_environment(synthetic_mirror: Path, tmp_path: Path) -> dict[str, str]:
    """The test's environment without PREFECT_API_URL, as on a machine with no Prefect server configured,
    and a Prefect home of its own: the runs' temporary servers share no database with the tests' server."""
    environment = {name: value for name, value in os.environ.items() if name != "PREFECT_API_URL"}
    return environment | {"PREFECT_HOME": str(tmp_path / "prefect-home")}


def test_run_with_its_own_temporary_server(user_environment: dict[str, str], synthetic_mirror: Path, tmp_path: Path) -> None:
    home = Path(user_environment["PREFECT_HOME"])  # a first run: the temporary server creates Prefect's database
    done = subprocess.run([sys.executable, str(FLOW_SCRIPT), *tiny_args(), "--mirror", str(synthetic_mirror)],
                          cwd=tmp_path, env=user_environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-3].startswith("Test accuracy: ")
    assert lines[-2] == "Run directory: runs/fashion_mnist_experiment_1"
    assert lines[-1] == "Open TensorBoard: tensorboard --logdir runs/fashion_mnist_experiment_1"
    assert (tmp_path / "runs" / "fashion_mnist_experiment_1" / "metrics.json").is_file()
    # The run is in Prefect's database for `prefect server start` to show: the flow run and every task
    # run in its final state (which the server records from events, before it stops).
    with closing(sqlite3.connect(home / "prefect.db")) as database:
        [(flow_run, state)] = database.execute("SELECT id, state_name FROM flow_run").fetchall()
        task_states = database.execute("SELECT state_name FROM task_run WHERE flow_run_id = ?", (flow_run,)).fetchall()
    assert state == "Completed"
    assert sorted(name for (name,) in task_states) == ["Completed"] * (len(STAGES) + 1)  # the stages and the report
    # It skipped registering Prefect's block types, and did not note them as registered, so that
    # `prefect server start` on this database still registers them.
    assert not (home / "memo_store.toml").exists()


def test_a_configured_server_is_used_and_no_temporary_server_starts(
    prefect_api_url: str, synthetic_mirror: Path, tmp_path: Path
) -> None:
    home = tmp_path / "prefect-home"
    done = subprocess.run([sys.executable, str(FLOW_SCRIPT), *tiny_args(), "--mirror", str(synthetic_mirror)],
                          cwd=tmp_path, env=os.environ | {"PREFECT_HOME": str(home), "PREFECT_API_URL": prefect_api_url},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs" / "fashion_mnist_experiment_1" / "metrics.json").is_file()
    assert not (home / "prefect.db").exists(), "a temporary server created a database beside the configured server"


def test_killed_run_leaves_no_server_behind(user_environment: dict[str, str], synthetic_mirror: Path, tmp_path: Path) -> None:
    process = subprocess.Popen([sys.executable, str(FLOW_SCRIPT), *tiny_args(), "--mirror", str(synthetic_mirror)],
                               cwd=tmp_path, env=user_environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        servers = wait_while_running(process, lambda: temporary_servers(process.pid), "a temporary server appeared", 60)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        _, alive = psutil.wait_procs(servers, timeout=15)
        assert not alive, "the temporary server outlived the run that started it"
    finally:
        if process.poll() is None:
            process.kill()


def test_ctrl_c_stops_the_run_and_its_helpers_at_once(
    user_environment: dict[str, str], synthetic_mirror: Path, tmp_path: Path
) -> None:
    # A terminal's Ctrl-C: SIGINT to the whole foreground process group, here while training runs.
    log = tmp_path / "run.log"
    with open(log, "wb") as output:
        process = subprocess.Popen([sys.executable, str(FLOW_SCRIPT), *tiny_args(epochs=500), "--mirror",
                                    str(synthetic_mirror)], cwd=tmp_path, env=user_environment,
                                   stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_while_running(process, lambda: list((tmp_path / "runs").glob("*/train-*/checkpoints/*.pt")),
                           "training started", 120, interval=0.1)
        helpers = psutil.Process(process.pid).children(recursive=True)  # the server and the figure process
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)  # the run stops its helpers itself, in order
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 60 s after Ctrl-C:\n{log.read_text()[-5000:]}")
        _, alive = psutil.wait_procs(helpers, timeout=15)
        assert not alive, f"left behind: {[' '.join(helper.cmdline()) for helper in alive]}"
        assert process.returncode != 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
