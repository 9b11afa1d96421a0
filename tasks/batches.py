"""Batches straight from uint8 tensors: a seeded order and per-batch normalisation, no per-image PIL."""

from __future__ import annotations

import torch

# The tutorial's transform, Normalize((0.5,), (0.5,)) after ToTensor, maps [0, 255] to [-1, 1].
MEAN, STD = 0.5, 0.5


def normalise(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 (B, 28, 28) on any device -> float (B, 1, 28, 28) in [-1, 1] on `device`."""
    # Copy the small uint8 batch first, then convert there: 4x less to move than float32.
    x = images.to(device, non_blocking=True).unsqueeze(1).float()
    return x.div_(255).sub_(MEAN).div_(STD)


class SeededOrder:
    """The order of the training set for each epoch, drawn from one seeded generator.

    Its state, taken at the start of an epoch, is all a resume needs to draw that epoch's order again.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)

    def state(self) -> torch.Tensor:
        """The generator state before the current epoch's order is drawn."""
        return self.generator.get_state()

    def restore(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def next_epoch(self) -> torch.Tensor:
        """A permutation of range(size) for the next epoch."""
        return torch.randperm(self.size, generator=self.generator)


def batch_count(size: int, batch_size: int) -> int:
    """Batches per epoch, the last one possibly smaller (as DataLoader with drop_last=False)."""
    return -(-size // batch_size)
