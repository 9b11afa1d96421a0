"""The download stage: Fashion-MNIST through torchvision's own download code, md5-verified, and decoded
once into a uint8 tensor cache.

torch and torchvision are imported only when there is work to do: a cached rerun reads only the manifest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from prefect.tasks import exponential_backoff

from fashion_pipeline.tasks.config import is_url
from fashion_pipeline.tasks.ml.dataset import decode
from fashion_pipeline.tasks.plumbing.failures import PermanentError, TransientError, flat
from fashion_pipeline.tasks.plumbing.files import atomic_write, digest_json, made_folder, md5_file
from fashion_pipeline.tasks.stage import StageOutput, Written, stage

# torchvision's FashionMNIST.resources (a test checks that they agree), written out so that a cached
# rerun, which only checks these, never pays for importing torchvision.
OFFICIAL_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
CHECKSUMS_ENV = "FASHION_MNIST_CHECKSUMS"


class DatasetChecksumError(PermanentError):
    """A dataset file whose md5 is wrong or that is missing from a local mirror: retrying cannot help."""


class DatasetDownloadError(TransientError):
    """A download that failed on the way (network, HTTP): worth retrying."""


class MirrorRefusedError(PermanentError):
    """A mirror that answers a request with a client error (404, 403, ...): the same request fails again."""


# HTTP client errors that are a request's own fault, which a retry repeats: all 4xx but a timeout and a rate limit.
TRANSIENT_CLIENT_ERRORS = frozenset({408, 429})


def expected_files() -> dict[str, str]:
    """The four `.gz` files and their md5: torchvision's official list, or the JSON file named by
    env FASHION_MNIST_CHECKSUMS (for Fashion-MNIST-format data other than the official files)."""
    override = os.environ.get(CHECKSUMS_ENV)
    if not override:
        return dict(OFFICIAL_FILES)
    try:
        files = json.loads(Path(override).read_text())
    except (OSError, ValueError) as error:
        raise DatasetChecksumError(f"{CHECKSUMS_ENV}={override}: cannot read a JSON object of file -> md5 ({error})") from None
    if set(files) != set(OFFICIAL_FILES):
        raise DatasetChecksumError(f"{CHECKSUMS_ENV}={override}: expected md5 for {', '.join(OFFICIAL_FILES)}")
    return files


def dataset_output(data_dir: str, **_: object) -> StageOutput:
    """Where the download stage records the verified dataset, and the md5 list it must match."""
    return Path(data_dir) / "FashionMNIST" / "dataset.json", {"md5": expected_files()}


@stage(
    "download",
    output=dataset_output,
    ignore=("mirror",),  # every source is md5-checked against the same list
    serializable=True,  # experiments sharing a data folder download it once
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
)
def download(data_dir: str, mirror: str | None = None) -> Written:
    """Fetch, verify and decode Fashion-MNIST into `data_dir`.

    Args:
        data_dir: root folder; torchvision's layout `FashionMNIST/raw/` is kept, so torchvision reads it too.
        mirror: an http(s) URL or a local folder with the four `.gz` files; None for the official mirrors.

    Returns:
        The decoded cache, with the source files' md5 and fingerprint: the dataset manifest that
        every later stage reads (tasks/ml/dataset.py).
    """
    manifest_path, facts = dataset_output(data_dir)
    files = facts["md5"]
    final_raw = manifest_path.parent / "raw"
    # Staged beside the published files, on the same file system, so that publishing is a rename.
    with made_folder(final_raw), tempfile.TemporaryDirectory(dir=manifest_path.parent, prefix=".staging-") as staging:
        staged_raw = Path(staging) / "FashionMNIST" / "raw"
        staged_raw.mkdir(parents=True)
        _stage_verified_copies(final_raw, staged_raw, files, strict=False)  # earlier downloads are not fetched again
        if mirror and not is_url(mirror):
            _stage_verified_copies(Path(mirror), staged_raw, files, strict=True)
        _fetch_with_torchvision(Path(staging), files, mirror)
        import torch

        cache_path = manifest_path.parent / f"fashion-mnist-{digest_json(files)[:12]}.pt"
        atomic_write(cache_path, lambda stream: torch.save(decode(Path(staging)), stream))
        for name in files:  # publish the verified .gz files and their decoded IDX twins
            for published in (name, name.removesuffix(".gz")):
                os.replace(staged_raw / published, final_raw / published)
    return Written([cache_path], {"cache": cache_path.name, "fingerprint": digest_json(files)})


def _stage_verified_copies(source: Path, staged_raw: Path, files: dict[str, str], strict: bool) -> None:
    """Copy the files of `source` whose md5 is right into the staging folder.

    With `strict` (a local mirror), a missing or wrong file is an error naming it; otherwise
    (earlier downloads) it is skipped and fetched again.
    """
    for name, md5 in files.items():
        candidate = source / name
        if not candidate.is_file():
            if strict:
                raise DatasetChecksumError(f"mirror folder {source} has no {name}: put the official file there")
            continue
        actual = md5_file(candidate)
        if actual == md5:
            shutil.copyfile(candidate, staged_raw / name)
        elif strict:
            raise DatasetChecksumError(f"{candidate}: md5 {actual} does not match the expected {md5}: "
                                       "replace it with the official file")


def _fetch_with_torchvision(root: Path, files: dict[str, str], mirror: str | None) -> None:
    """Run torchvision's own download (md5-checked) and extraction into `root`."""
    from torchvision.datasets import FashionMNIST

    mirrors = [mirror.rstrip("/") + "/"] if mirror and is_url(mirror) else FashionMNIST.mirrors
    # Same class name as torchvision's, so the files land in its `FashionMNIST/raw` layout.
    dataset_class = type("FashionMNIST", (FashionMNIST,), {"mirrors": mirrors, "resources": list(files.items())})
    try:
        dataset_class(str(root), train=True, download=True)
    except RuntimeError as error:
        raw = root / "FashionMNIST" / "raw"
        for name, md5 in files.items():
            if (raw / name).is_file() and (actual := md5_file(raw / name)) != md5:
                raise DatasetChecksumError(f"{mirrors[0]}{name}: md5 {actual} does not match the expected {md5}: "
                                           "the mirror serves another file; use another mirror") from None
        # torchvision reports each mirror's error as text only: urllib's "HTTP Error 404: Not Found".
        if (status := re.search(r"HTTP Error (4\d\d)", str(error))) and int(status[1]) not in TRANSIENT_CLIENT_ERRORS:
            missing = next((name for name in files if not (raw / name).is_file()), "a file")
            raise MirrorRefusedError(f"{mirrors[0]}{missing}: the mirror answers HTTP {status[1]}: give --mirror the "
                                     "URL of a folder that serves the four official .gz files") from None
        raise DatasetDownloadError(f"downloading Fashion-MNIST failed: {flat(str(error))}") from error
