"""What the tests share besides fixtures: the tiny settings, running the flow, comparing weights, free ports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from fashion_pipeline.tasks.plumbing.polling import wait_for
from tests.synthetic import TRAIN_SIZE

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "fashion-mnist"
FLOW_SCRIPT = REPO / "flows" / "fashion.py"
# Small settings that still exercise every stage: 160 training images in batches of 4 = 40 steps an epoch.
T = TypeVar("T")
TINY = {"epochs": 2, "batch_size": 4, "lr": 0.02, "log_every": 10, "checkpoint_every": 15, "device": "cpu"}
TASK_RUNS = 7  # of one complete flow attempt: the six stages and the report
VALIDATION = 20  # the images a sweep holds out of the synthetic training set (sweeps must validate)


def run_flow_script(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python flows/fashion.py ARGS` in `cwd`, capturing its output."""
    return subprocess.run(
        [sys.executable, str(FLOW_SCRIPT), *args], cwd=cwd, env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=timeout,
    )


def wait_while_running(process: subprocess.Popen, check: Callable[[], T], what: str, timeout: float,
                       interval: float = 0.05) -> T:
    """Poll `check` until it returns something truthy, and return that; fail if `process` ends first."""

    def ready() -> T:
        assert process.poll() is None, f"the run ended (status {process.returncode}) before {what}"
        return check()

    return wait_for(ready, what, timeout, interval)


def tiny_args(**overrides: object) -> list[str]:
    """TINY (with overrides) as command-line options."""
    return [text for name, value in (TINY | overrides).items() for text in (f"--{name.replace('_', '-')}", str(value))]


def run_tiny_flow(root: Path, mirror: Path, experiment: str = "tiny", **overrides: object) -> dict:
    """Run the flow in-process on the synthetic data under `root` (runs/ and data/), TINY settings with overrides."""
    from fashion_pipeline.flows.fashion import fashion

    return fashion(experiment=experiment, runs_dir=str(root / "runs"), data_dir=str(root / "data"),
                   mirror=str(mirror), **(TINY | overrides))


def total_steps(settings: dict = TINY, train_size: int = TRAIN_SIZE) -> int:
    """Optimizer steps of a training with these settings (the batch sizes used here divide the data evenly)."""
    return settings["epochs"] * train_size // settings["batch_size"]


def expected_loss_steps(settings: dict = TINY, train_size: int = TRAIN_SIZE) -> list[int]:
    """The steps at which such a training logs its loss (and its predictions figure): every log_every."""
    return list(range(settings["log_every"], total_steps(settings, train_size) + 1, settings["log_every"]))


def final_weights(result: dict) -> dict:
    """The exported model's state dict of a finished run."""
    import torch

    return torch.load(Path(result["train_dir"]) / "model.pt", weights_only=True)["model"]


def same_weights(first: dict, second: dict) -> bool:
    """Bitwise equality of two state dicts."""
    import torch

    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


def stop_local_server(home: Path) -> None:
    """Stop the local Prefect server that runs for Prefect home `home`, if one does."""
    import psutil

    try:
        server = psutil.Process(json.loads((home / "server.json").read_text())["pid"])
        server.terminate()
        server.wait(timeout=30)
    except (OSError, ValueError, psutil.NoSuchProcess):
        pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
