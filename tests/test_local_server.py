"""The local Prefect server (tasks/plumbing/local_server.py) as users meet it: Prefect's defaults, a new Prefect home.

Each test gets a Prefect home of its own, without PREFECT_API_URL and without the tests' analytics
opt-out, so the runs start (or share) the home's local server as on a new machine; the server is
stopped when the test ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from fashion_pipeline.tasks.plumbing import local_server
from fashion_pipeline.tasks.plumbing.polling import wait_for
from tests.helpers import FLOW_SCRIPT, REPO, TASK_RUNS, VALIDATION, stop_local_server, tiny_args, wait_while_running

SWEEP_SCRIPT = REPO / "flows" / "sweep.py"


@pytest.fixture
def new_home(synthetic_mirror: Path, tmp_path: Path) -> Iterator[dict[str, str]]:
    """An environment as on a new machine: Prefect's defaults, a new Prefect home; its server stopped at the end."""
    home = tmp_path / "prefect-home"
    unset = ("PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED", local_server.IDLE_ENV)
    environment = {name: value for name, value in os.environ.items() if name not in unset}
    yield environment | {"PREFECT_HOME": str(home)}
    stop_local_server(home)


def run(script: Path, *args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def home_of(env: dict[str, str]) -> Path:
    return Path(env["PREFECT_HOME"])


def api(env: dict[str, str]) -> str:
    """The API of the home's local server."""
    return json.loads((home_of(env) / local_server.STATE).read_text())["url"]


def recorded(env: dict[str, str], kind: str) -> list[dict]:
    """Every flow run or task run (`kind`) in the home's Prefect database, through the server's API."""
    with httpx.Client(trust_env=False) as client:
        response = client.post(f"{api(env)}/{kind}/filter", json={})
    response.raise_for_status()
    return response.json()


def assert_quiet(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "| ERROR" not in done.stderr, done.stderr[-3000:]


def stages(run_dir: Path) -> dict[str, str]:
    return json.loads((run_dir / "metrics.json").read_text())["stages"]


# --- fast ------------------------------------------------------------------------------------------


def test_prefect_internals_are_those_the_server_uses() -> None:
    # Fails when a Prefect upgrade changes what tasks/plumbing/local_server.py relies on; the runs then fall back.
    assert local_server.incompatibility() is None
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"prefect>={local_server.TESTED_PREFECT}' in pyproject and "<3.10" in pyproject


def test_an_untested_prefect_falls_back_to_its_own_server(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setattr(local_server, "TESTED_PREFECT", "2.0")
    monkeypatch.setattr(local_server, "_pending", None)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.warns(UserWarning, match="not the tested 2.0 release; using Prefect's own temporary server"):
            local_server.start()
        with local_server.local_server_settings() as server:
            assert server is None and PREFECT_API_URL.value() is None  # Prefect starts its own server
        with pytest.warns(UserWarning, match="not the tested 2.0 release"):
            assert local_server.main(["start"]) == 0
    assert capsys.readouterr().out.startswith("no local Prefect server started: Prefect ")


def test_ephemeral_server_turned_off_is_one_line(new_home: dict[str, str], synthetic_mirror: Path,
                                                 tmp_path: Path) -> None:
    env = new_home | {"PREFECT_SERVER_EPHEMERAL_ENABLED": "false"}
    done = run(FLOW_SCRIPT, *tiny_args(), "--mirror", str(synthetic_mirror), env=env, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "fashion.py: error: no Prefect server to record the run: PREFECT_API_URL is not set and "
        "PREFECT_SERVER_EPHEMERAL_ENABLED is off; set one of them")
    assert "Traceback" not in done.stderr
    assert not (home_of(env) / "prefect.db").exists()


# --- real runs -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_first_run_and_cached_rerun_on_a_new_home(new_home: dict[str, str], synthetic_mirror: Path,
                                                 tmp_path: Path) -> None:
    args = [*tiny_args(), "--mirror", str(synthetic_mirror)]
    first = run(FLOW_SCRIPT, *args, env=new_home, cwd=tmp_path)
    assert_quiet(first)
    # Its first line, before anything else: what the first seconds are spent on.
    assert first.stderr.splitlines()[0] == (f"Starting the local Prefect server of {home_of(new_home)} "
                                            "(its first start: creating its database)...")
    server = local_server.running(home_of(new_home))
    rerun = run(FLOW_SCRIPT, *args, env=new_home, cwd=tmp_path)
    assert_quiet(rerun)
    assert "Starting the local Prefect server" not in rerun.stderr  # it runs already
    assert local_server.running(home_of(new_home)) == server, "the rerun did not use the same server"
    assert set(stages(tmp_path / "runs" / "fashion_mnist_experiment_1").values()) == {"Cached"}

    # Both runs are in Prefect's database, every flow run and task run in its final state.
    flow_runs, task_runs = recorded(new_home, "flow_runs"), recorded(new_home, "task_runs")
    assert [run["state_name"] for run in flow_runs] == ["Completed"] * 2
    assert len(task_runs) == 2 * TASK_RUNS
    assert {run["state_type"] for run in task_runs} == {"COMPLETED"}
    assert not (home_of(new_home) / "memo_store.toml").exists()  # block types left for `prefect server start`

    # The link printed at the end opens the run in the UI the server serves.
    [link] = [line.split()[2] for line in rerun.stdout.splitlines() if line.startswith("Prefect UI: ")]
    assert link.startswith(server.ui_url + "/runs/flow-run/")
    with httpx.Client(trust_env=False) as client:
        page = client.get(link, headers={"Accept": "text/html"})
        settings = client.get(f"{server.ui_url}/ui-settings").json()
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert settings["api_url"] == server.url  # the UI in the browser talks to this server


@pytest.mark.slow
def test_concurrent_first_runs_share_one_server_and_one_download(new_home: dict[str, str], synthetic_mirror: Path,
                                                                tmp_path: Path) -> None:
    runs = [subprocess.Popen([sys.executable, str(FLOW_SCRIPT), *tiny_args(epochs=1), "--mirror", str(synthetic_mirror),
                              "--experiment", f"concurrent-{index}"], cwd=tmp_path, env=new_home,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for index in range(3)]
    outputs = [process.communicate(timeout=600) for process in runs]
    for process, (_, stderr) in zip(runs, outputs):
        assert process.returncode == 0, stderr[-3000:]
        assert "Traceback" not in stderr and "| ERROR" not in stderr, stderr[-3000:]
    downloads = sorted(stages(tmp_path / "runs" / f"concurrent-{index}")["download"] for index in range(3))
    assert downloads == ["Cached", "Cached", "Completed"]
    assert len(recorded(new_home, "flow_runs")) == 3


@pytest.mark.slow
def test_first_sweep_on_a_new_home(new_home: dict[str, str], synthetic_mirror: Path, tmp_path: Path) -> None:
    done = run(SWEEP_SCRIPT, "--grid", json.dumps({"lr": [0.01, 0.05]}), "--workers", "2",
               "--mirror", str(synthetic_mirror), *tiny_args(epochs=1, validation_size=VALIDATION), env=new_home,
               cwd=tmp_path)
    assert_quiet(done)
    assert json.loads((tmp_path / "runs" / "sweep" / "sweep.json").read_text())["completed"] == 2
    flow_runs = recorded(new_home, "flow_runs")
    assert [run["state_name"] for run in flow_runs] == ["Completed"]
    assert {run["state_type"] for run in recorded(new_home, "task_runs")} == {"COMPLETED"}


@pytest.mark.slow
def test_killed_run_leaves_the_server_up_until_it_is_idle(new_home: dict[str, str], synthetic_mirror: Path,
                                                         tmp_path: Path) -> None:
    env = new_home | {local_server.IDLE_ENV: "3"}
    process = subprocess.Popen([sys.executable, str(FLOW_SCRIPT), *tiny_args(epochs=500), "--mirror",
                                str(synthetic_mirror)], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_while_running(process, lambda: list((tmp_path / "runs").glob("*/train-*/checkpoints/*.pt")),
                           "training started", 120, interval=0.1)
        server = local_server.running(home_of(env))
        time.sleep(4)  # longer than the idle time: a run that is alive keeps the server up
        assert local_server.running(home_of(env)) == server
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    # Its lease went with it: the server stops itself once idle, and says so in no run's terminal.
    psutil.Process(server.pid).wait(timeout=30)
    assert not (home_of(env) / local_server.STATE).exists()
    rerun = run(FLOW_SCRIPT, *tiny_args(), "--mirror", str(synthetic_mirror), env=env, cwd=tmp_path)
    assert_quiet(rerun)


def test_a_run_outlives_its_local_server(new_home: dict[str, str], prefect_api_url: str, tmp_path: Path) -> None:
    """The local server SIGKILLed mid-training: the run starts it again at the same address and goes on."""
    import torch

    from tests.helpers import TINY, final_weights, run_tiny_flow, same_weights
    from tests.synthetic import write_synthetic_fashion_mnist

    mirror = tmp_path / "mirror"
    checksums = str(write_synthetic_fashion_mnist(mirror, train_size=4000, test_size=200))
    settings = TINY | {"log_every": 50, "checkpoint_every": 300}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASHION_MNIST_CHECKSUMS", checksums)
        reference = run_tiny_flow(tmp_path / "reference", mirror, **settings)
    env = new_home | {"FASHION_MNIST_CHECKSUMS": checksums}
    process = subprocess.Popen([sys.executable, str(FLOW_SCRIPT), *tiny_args(**settings), "--mirror", str(mirror)],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_while_running(process, lambda: list((tmp_path / "runs").glob("*/train-*/checkpoints/step-00000300.pt")),
                           "the checkpoint at step 300", 120, interval=0.01)
        killed = local_server.running(home_of(env))
        os.kill(killed.pid, signal.SIGKILL)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "| ERROR" not in stderr, stderr[-3000:]
    assert f"The local Prefect server (pid {killed.pid}) has stopped; starting it again at {killed.url}" in stderr
    train_dir = next((tmp_path / "runs").glob("*/train-*"))
    assert same_weights(torch.load(train_dir / "model.pt", weights_only=True)["model"], final_weights(reference))
    # The new server, at the same address, has the whole record: the run and every task run of it ended.
    assert api(env) == killed.url
    [flow_run] = recorded(env, "flow_runs")
    assert flow_run["state"]["type"] == "COMPLETED"
    task_runs = recorded(env, "task_runs")
    assert len(task_runs) == TASK_RUNS and {task_run["state"]["type"] for task_run in task_runs} == {"COMPLETED"}


@pytest.mark.slow
def test_stop_command(new_home: dict[str, str], tmp_path: Path) -> None:
    command = [sys.executable, "-m", "fashion_pipeline.tasks.plumbing.local_server"]
    started = subprocess.run([*command, "start"], env=new_home, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr
    server = local_server.running(home_of(new_home))
    assert started.stdout.strip().endswith(server.ui_url)
    stopped = subprocess.run([*command, "stop"], env=new_home, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert stopped.stdout.strip() == f"stopped the local Prefect server at {server.ui_url}"
    wait_for(lambda: not psutil.pid_exists(server.pid), "the server exiting", 30)
    status = subprocess.run([*command, "status"], env=new_home, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert status.stdout.strip() == f"no local Prefect server runs for {home_of(new_home)}"
