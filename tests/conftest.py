"""Shared fixtures: an isolated Prefect home and one Prefect server per session, synthetic and real data."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

# Before Prefect is imported: no telemetry, and a Prefect home (database, result cache) of our own.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="fashion-tests-prefect-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("FASHION_MNIST_MIRROR", None)

from fashion_pipeline.tasks.plumbing.polling import wait_for  # noqa: E402
from tests.synthetic import TRAIN_SIZE, write_synthetic_fashion_mnist  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "fashion-mnist"
FLOW_SCRIPT = REPO / "flows" / "fashion.py"
# Small settings that still exercise every stage: 160 training images in batches of 4 = 40 steps an epoch.
T = TypeVar("T")
TINY = {"epochs": 2, "batch_size": 4, "lr": 0.02, "log_every": 10, "checkpoint_every": 15, "device": "cpu"}
VALIDATION = 20  # the images a sweep holds out of the synthetic training set (sweeps must validate)


# Fixtures that start a service (a Prefect server, a Dask cluster) or read the real data: a test that
# uses one, directly or through another fixture, is `slow`, so that `pytest -m "not slow"` is a fast loop.
# Tests that start a service themselves (a command-line run) carry the mark in their module.
SLOW_FIXTURES = frozenset({"prefect_api_url", "real_data", "server", "dask_address", "user_environment"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def prefect_api_url() -> Iterator[str]:
    """One temporary Prefect server (SQLite in the test Prefect home) for the whole session."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        url = PREFECT_API_URL.value()
        os.environ["PREFECT_API_URL"] = url  # subprocesses started by tests use the same server
        yield url
        os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def synthetic_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the four synthetic `.gz` files and their `checksums.json`."""
    folder = tmp_path_factory.mktemp("synthetic-mirror")
    write_synthetic_fashion_mnist(folder)
    return folder


@pytest.fixture(scope="session")
def finished_run(prefect_api_url: str, synthetic_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One flow run on the synthetic data (TINY settings), shared by the tests that only read its outputs."""
    root = tmp_path_factory.mktemp("flow")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASHION_MNIST_CHECKSUMS", str(synthetic_folder / "checksums.json"))
        result = run_tiny_flow(root, synthetic_folder)
    return root / "runs" / "tiny", result


@pytest.fixture
def synthetic_mirror(synthetic_folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The synthetic folder, with the download stage told to expect its md5s."""
    monkeypatch.setenv("FASHION_MNIST_CHECKSUMS", str(synthetic_folder / "checksums.json"))
    return synthetic_folder


@pytest.fixture
def real_data(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The official Fashion-MNIST files beside the repository; skips when they are not there."""
    if not all((SHARED_DATA / name).is_file() for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")):
        pytest.skip(f"real Fashion-MNIST files not found in {SHARED_DATA}")
    monkeypatch.delenv("FASHION_MNIST_CHECKSUMS", raising=False)
    return SHARED_DATA


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
    import json

    import psutil

    try:
        server = psutil.Process(json.loads((home / "server.json").read_text())["pid"])
        server.terminate()
        server.wait(timeout=30)
    except (OSError, ValueError, psutil.NoSuchProcess):
        pass
