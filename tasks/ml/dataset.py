"""Fashion-MNIST as tensors: its class names, the IDX files decoded with torchvision, and the decoded cache read back.

torch and torchvision are imported by the functions that use them: a cached rerun reads only manifests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torchvision's FashionMNIST.classes (a test checks that they agree), written out so that a cached
# rerun, which only names them, never pays for importing torchvision.
CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def decode(root: Path) -> dict[str, torch.Tensor]:
    """The IDX files under `root/FashionMNIST/raw`, read by torchvision: uint8 images (N, 28, 28), int64 labels."""
    from torchvision.datasets import FashionMNIST

    train = FashionMNIST(str(root), train=True)
    test = FashionMNIST(str(root), train=False)
    return {
        "train_images": train.data.contiguous(),
        "train_labels": train.targets.contiguous(),
        "test_images": test.data.contiguous(),
        "test_labels": test.targets.contiguous(),
    }


def load_split(dataset_manifest: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The uint8 images (N, 28, 28) and int64 labels of `split` ('train' or 'test') from the decoded cache."""
    import torch

    manifest = json.loads(Path(dataset_manifest).read_text())
    # weights_only: the cache is data, never code; mmap: pages are read only when used.
    tensors = torch.load(Path(dataset_manifest).parent / manifest["cache"], weights_only=True, mmap=True)
    return tensors[f"{split}_images"], tensors[f"{split}_labels"]


def fingerprint(dataset_manifest: Path) -> str:
    """The dataset's fingerprint, from its manifest: a digest of its source files' md5."""
    return json.loads(Path(dataset_manifest).read_text())["fingerprint"]
