"""The tutorial's training with nothing around it: the floor that bench/bench.py holds the flow's training time to.

Decoded uint8 tensors in memory, one seeded order, per-batch normalisation, the same Net, SGD(0.001, 0.9),
batch 4, one epoch; no logging, no checkpoints. Prints one JSON line at the end:
{"train_seconds": ..., "test_accuracy": ...}.

    python bench/bare_loop.py --data-dir DATA [--device cuda]

DATA/FashionMNIST/raw must hold the four extracted IDX files (as torchvision leaves them).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.datasets.mnist import read_image_file, read_label_file

from fashion_pipeline.tasks.ml.batches import SeededOrder, normalise
from fashion_pipeline.tasks.ml.model import Net

BATCH_SIZE, LR, MOMENTUM, EVAL_BATCH = 4, 0.001, 0.9, 1000
# The flow's training turns oneDNN off for batches this small (tasks/train.py): PyTorch's own convolutions
# are faster here. With the same convolutions, the flow's training time over this loop's measures what
# the flow adds around the steps, less what its fused optimizer step saves.
ONEDNN = False


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True,
                        help="Folder whose FashionMNIST/raw holds the extracted IDX files.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the initial weights and the data order.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N].")
    parser.add_argument("--max-batches", type=int, default=None,
                        help="Stop training after this many batches (quick checks).")
    return parser.parse_args(argv)


def load_split(data_dir: str, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 28, 28) and int64 labels (N,) of 'train' or 't10k', decoded by torchvision."""
    raw = Path(data_dir) / "FashionMNIST" / "raw"
    images = read_image_file(str(raw / f"{prefix}-images-idx3-ubyte"))
    return images, read_label_file(str(raw / f"{prefix}-labels-idx1-ubyte"))


def synchronize(device: torch.device) -> None:
    # CUDA runs asynchronously: without this, the clock would stop before the last steps ran.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int, max_batches: int | None) -> float:
    """One epoch of SGD on batches of 4 in a seeded order; returns its wall time in seconds."""
    device = next(net.parameters()).device
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    images, labels = images.to(device), labels.to(device)  # 47 MB of uint8: one copy, then index
    order = SeededOrder(len(images), seed).next_epoch().to(device)
    starts = range(0, len(images), BATCH_SIZE)[:max_batches]
    synchronize(device)
    started = time.perf_counter()
    with torch.backends.mkldnn.flags(enabled=ONEDNN):
        for start in starts:
            index = order[start:start + BATCH_SIZE]
            inputs = normalise(images[index], device)  # (B, 1, 28, 28)
            optimizer.zero_grad(set_to_none=True)
            criterion(net(inputs), labels[index]).backward()
            optimizer.step()
    synchronize(device)
    return time.perf_counter() - started


def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of the test images classified correctly, in large batches."""
    device = next(net.parameters()).device
    with torch.no_grad():
        predicted = torch.cat([net(normalise(chunk, device)).argmax(dim=1).cpu() for chunk in images.split(EVAL_BATCH)])
    return (predicted == labels).float().mean().item()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # batches of 4: per-op overhead dominates, which extra threads only add to
    train_images, train_labels = load_split(args.data_dir, "train")
    test_images, test_labels = load_split(args.data_dir, "t10k")
    torch.manual_seed(args.seed)  # the same initial weights as the flow's for the same seed
    net = Net().to(args.device)
    seconds = train(net, train_images, train_labels, args.seed, args.max_batches)
    net.eval()
    test_accuracy = accuracy(net, test_images, test_labels)
    print(json.dumps({"train_seconds": round(seconds, 3), "test_accuracy": round(test_accuracy, 4)}))


if __name__ == "__main__":
    main()
