"""Tiny Fashion-MNIST-format data for fast tests: real IDX `.gz` files, read by the real loaders."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from pathlib import Path

import numpy as np

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


def _idx_gz(path: Path, magic: int, array: np.ndarray) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", size) for size in array.shape)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


def synthetic_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noisy images whose bright band's position encodes the label, so a few steps learn something."""
    images = rng.integers(0, 60, size=(len(labels), 28, 28))
    for index, label in enumerate(labels):
        images[index, 2 + 2 * label: 5 + 2 * label, 4:24] += 180
    return images.clip(0, 255)


TRAIN_SIZE = 160  # training images in the default synthetic set


def write_synthetic_fashion_mnist(folder: Path, train_size: int = TRAIN_SIZE, test_size: int = 80, seed: int = 0) -> Path:
    """Write the four `.gz` files and `checksums.json` (name -> md5) into `folder`; returns the checksums file.

    Point env FASHION_MNIST_CHECKSUMS at that file so the download stage expects these md5s.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, size in (("train", train_size), ("t10k", test_size)):
        labels = np.arange(size) % 10
        rng.shuffle(labels)
        _idx_gz(folder / f"{prefix}-images-idx3-ubyte.gz", IMAGE_MAGIC, synthetic_images(labels, rng))
        _idx_gz(folder / f"{prefix}-labels-idx1-ubyte.gz", LABEL_MAGIC, labels)
    checksums = {path.name: hashlib.md5(path.read_bytes()).hexdigest() for path in sorted(folder.glob("*.gz"))}
    checksums_file = folder / "checksums.json"
    checksums_file.write_text(json.dumps(checksums, indent=2))
    return checksums_file
