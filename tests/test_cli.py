"""`python flows/fashion.py` as a user runs it: with a configured Prefect server, and stopped by Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.helpers import FLOW_SCRIPT, stop_local_server, tiny_args, wait_while_running

SERVER_MARK = "fashion_pipeline.tasks.plumbing.local_server"


@pytest.fixture
def user_environment(synthetic_mirror: Path, tmp_path: Path) -> dict[str, str]:
    """The test's environment without PREFECT_API_URL, as on a machine with no Prefect server configured,
    and a Prefect home of its own: its local server shares no database with the tests' server."""
    environment = {name: value for name, value in os.environ.items() if name != "PREFECT_API_URL"}
    return environment | {"PREFECT_HOME": str(tmp_path / "prefect-home")}


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
        # The figure process; the local Prefect server outlives the run on purpose.
        helpers = [child for child in psutil.Process(process.pid).children(recursive=True)
                   if SERVER_MARK not in " ".join(child.cmdline())]
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
        stop_local_server(Path(user_environment["PREFECT_HOME"]))


@pytest.mark.parametrize("command", [[str(FLOW_SCRIPT), "--serve"],
                                     [str(FLOW_SCRIPT.parent / "notices.py"), "--webhook", "http://127.0.0.1:9/x"]],
                         ids=["--serve", "notices.py"])
def test_an_unreachable_prefect_server_is_one_line(command: list[str], user_environment: dict[str, str],
                                                   tmp_path: Path) -> None:
    from tests.helpers import free_port

    done = subprocess.run([sys.executable, *command], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=user_environment | {"PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(f"{Path(command[0]).name}: error: ConnectError")
    assert "Traceback" not in done.stdout + done.stderr
