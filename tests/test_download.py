"""The download stage: torchvision's real download code against a loopback mirror, md5 checks, retries."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torchvision.datasets import FashionMNIST

from fashion_pipeline.tasks.download import DatasetChecksumError, MirrorRefusedError, download
from fashion_pipeline.tasks.ml.dataset import load_split
from tests.helpers import TINY
from tests.mirror import serve_mirror

LABELS = "train-labels-idx1-ubyte.gz"
GETS_PER_FILE = 2  # torchvision probes each URL for redirects with a GET, then downloads it


def corrupt(path: Path) -> None:
    """Flip one byte in the middle of the file."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def nothing_valid_left(data_dir: Path) -> bool:
    """No manifest, no decoded cache and no file of the failed download where a later run would look."""
    root = data_dir / "FashionMNIST"
    return not (root / "dataset.json").exists() and not list(root.glob("*.pt")) and not list(root.glob("raw/train-labels*"))


def test_real_files_from_http_mirror(real_data: Path, tmp_path: Path) -> None:
    with serve_mirror(real_data) as (url, gets):
        manifest = download(str(tmp_path / "data"), mirror=url)
        assert sum(gets.values()) == 4 * GETS_PER_FILE
        images, labels = load_split(manifest, "train")
        assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
        assert torch.bincount(labels).tolist() == [6000] * 10
        assert load_split(manifest, "test")[0].shape == (10000, 28, 28)
        # A rerun finds the verified copy: nothing downloaded or decoded again.
        assert download(str(tmp_path / "data"), mirror=url) == manifest
        assert sum(gets.values()) == 4 * GETS_PER_FILE
    # torchvision's own layout, so the data is usable without this project too.
    assert len(FashionMNIST(str(tmp_path / "data"), train=False)) == 10000


@pytest.fixture
def outside_a_flow() -> Iterator[None]:
    """The download task run on its own, as these tests do: its retry messages stay off the API, which
    takes task-run logs within a flow run only (Prefect warns of each otherwise)."""
    from prefect.settings import PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW, temporary_settings

    with temporary_settings({PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore"}):
        yield


def test_corrupted_file_on_mirror_fails_at_once_and_leaves_nothing_valid(
    real_data: Path, prefect_api_url: str, tmp_path: Path, outside_a_flow: None
) -> None:
    mirror = tmp_path / "mirror"
    shutil.copytree(real_data, mirror)
    corrupt(mirror / LABELS)
    data_dir = tmp_path / "data"
    with serve_mirror(mirror) as (url, gets):
        quick = download.task.with_options(retry_delay_seconds=0)
        with pytest.raises(DatasetChecksumError, match=f"{LABELS}: md5 .* does not match the expected 25c81989"):
            quick(str(data_dir), mirror=url)
        assert gets[f"/{LABELS}"] == GETS_PER_FILE, "an md5 mismatch must not be retried"
    assert nothing_valid_left(data_dir)
    with serve_mirror(real_data) as (url, _):  # the mirror mended: the next run succeeds
        assert download(str(data_dir), mirror=url).is_file()


def test_network_errors_are_retried(synthetic_mirror: Path, prefect_api_url: str, tmp_path: Path,
                                    outside_a_flow: None) -> None:
    with serve_mirror(synthetic_mirror, failures=2) as (url, gets):
        manifest = download.task.with_options(retry_delay_seconds=0)(str(tmp_path / "data"), mirror=url)
    assert manifest.is_file()
    # Two attempts end at their first request's 503; the third fetches all four files.
    assert sum(gets.values()) == 2 + 4 * GETS_PER_FILE


def test_a_mirror_that_answers_404_is_asked_once(prefect_api_url: str, tmp_path: Path, outside_a_flow: None) -> None:
    (tmp_path / "empty").mkdir()
    with serve_mirror(tmp_path / "empty") as (url, gets):
        with pytest.raises(MirrorRefusedError, match=rf"^{url}train-images-idx3-ubyte.gz: the mirror answers HTTP 404: "):
            download.task.with_options(retry_delay_seconds=0)(str(tmp_path / "data"), mirror=url)
    assert sum(gets.values()) == 1  # one request of one attempt: a 404 is not retried
    assert not (tmp_path / "data").exists()


def test_corrupted_local_mirror_names_the_file(synthetic_mirror: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    shutil.copytree(synthetic_mirror, mirror)
    corrupt(mirror / LABELS)
    with pytest.raises(DatasetChecksumError, match=f"{mirror / LABELS}: md5"):
        download(str(tmp_path / "data"), mirror=str(mirror))
    assert nothing_valid_left(tmp_path / "data")
    assert not (tmp_path / "data").exists()  # a first download that failed leaves no empty folders either


def test_earlier_download_is_used_offline(synthetic_mirror: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    manifest = download(str(data_dir), mirror=str(synthetic_mirror))
    cache = next((data_dir / "FashionMNIST").glob("*.pt"))
    cache.unlink()
    # No mirror at all (the official ones are out of reach here): the verified .gz files in data_dir suffice.
    assert download(str(data_dir)) == manifest
    assert cache.is_file()


def test_mirror_from_a_prefect_variable(synthetic_mirror: Path, prefect_api_url: str, tmp_path: Path) -> None:
    # A run that names no mirror itself takes the one a server's Variable names (flows/fashion.py).
    from prefect.variables import Variable

    from fashion_pipeline.flows.fashion import MIRROR_VARIABLE, fashion

    Variable.set(MIRROR_VARIABLE, str(synthetic_mirror), overwrite=True)
    try:
        result = fashion(experiment="variable", runs_dir=str(tmp_path / "runs"), data_dir=str(tmp_path / "data"),
                         **(TINY | {"epochs": 1}))
    finally:
        Variable.unset(MIRROR_VARIABLE)
    assert result["stages"]["download"] == "Completed"
    assert (tmp_path / "data" / "FashionMNIST" / "dataset.json").is_file()
