"""Shared fixtures: an isolated Prefect home and one Prefect server per session, synthetic and real data.

The helpers that tests import are in tests/helpers.py; this module holds only fixtures and hooks.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before Prefect is imported: no telemetry, and a Prefect home (database, result cache) of our own.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="fashion-tests-prefect-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("FASHION_MNIST_MIRROR", None)

from tests.helpers import SHARED_DATA, TINY, run_tiny_flow  # noqa: E402
from tests.object_store import s3_server  # noqa: E402
from tests.synthetic import write_synthetic_fashion_mnist  # noqa: E402

# Fixtures that start a service (a Prefect server, a Dask cluster) or read the real data: a test that
# uses one, directly or through another fixture, is `slow`, so that `pytest -m "not slow"` is a fast loop.
# Tests that start a service themselves (a command-line run) carry the mark in their module.
SLOW_FIXTURES = frozenset({"prefect_api_url", "real_data", "server", "dask_address", "user_environment", "s3_endpoint"})


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


@pytest.fixture
def long_training(prefect_api_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict, dict]:
    """A synthetic mirror large enough that training lasts a few seconds (4000 / 4 = 1000 steps an
    epoch), the settings to train on it, and that training run uninterrupted, to compare a resumed one with."""
    mirror = tmp_path / "mirror"
    monkeypatch.setenv("FASHION_MNIST_CHECKSUMS", str(write_synthetic_fashion_mnist(mirror, train_size=4000, test_size=200)))
    settings = TINY | {"log_every": 50, "checkpoint_every": 300}
    return mirror, settings, run_tiny_flow(tmp_path / "reference", mirror, **settings)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real S3 API on loopback (rclone), reached through the standard AWS variables; yields the folder it serves."""
    root = tmp_path_factory.mktemp("s3")
    with s3_server(root) as variables, pytest.MonkeyPatch.context() as patch:
        for name, value in variables.items():
            patch.setenv(name, value)  # subprocesses and Dask workers started by tests inherit them
        yield root


@pytest.fixture
def bucket(s3_endpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new, empty bucket (its URL), and a new local mirror cache for this test: a machine of its own."""
    import fsspec

    name = f"bucket-{uuid.uuid4().hex[:10]}"
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(name)  # through the API: the server's view of its folder
    monkeypatch.setenv("FASHION_STORE_CACHE", str(tmp_path / "store-cache"))
    return f"s3://{name}"
