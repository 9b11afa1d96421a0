"""Batches straight from uint8 tensors: a seeded order and per-batch normalisation, no per-image PIL."""

from __future__ import annotations

import torch

from fashion_pipeline.tasks.config import ConfigError

# The tutorial's transform, Normalize((0.5,), (0.5,)) after ToTensor, maps [0, 255] to [-1, 1].
MEAN, STD = 0.5, 0.5
SPLIT_SEED_OFFSET = 7919  # the validation split draws from a stream of its own, not the data order's
AUGMENT_SEED_OFFSET = 104729  # and so does augmentation
# Validation and evaluation predict in large batches: a few big matrix products, not thousands of small ones.
INFERENCE_BATCH = 1000


def normalise(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 (B, 28, 28) on any device -> float (B, 1, 28, 28) in [-1, 1] on `device`."""
    # Copy the small uint8 batch first, then convert there: 4x less to move than float32.
    x = images.to(device, non_blocking=True).unsqueeze(1).float()
    return x.div_(255).sub_(MEAN).div_(STD)


class Augmentation:
    """Random shifts of up to `shift` pixels and horizontal flips of half the images, drawn from one seeded
    generator whose state a checkpoint keeps, so that a resumed training draws the same ones."""

    def __init__(self, seed: int, shift: int = 2) -> None:
        self.shift = shift
        self.generator = torch.Generator().manual_seed(seed + AUGMENT_SEED_OFFSET)

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def restore(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, H, W) -> the same, each shifted (zeros come in) and maybe flipped."""
        count, height, width = images.shape
        device = images.device
        offsets = None
        if self.shift:  # drawn before the flips, so that the draws stay those of the trainings before flips-only
            offsets = torch.randint(0, 2 * self.shift + 1, (2, count), generator=self.generator).to(device)
        flips = (torch.rand(count, generator=self.generator) < 0.5).to(device)
        if offsets is None:  # flips only: no gather
            return torch.where(flips[:, None, None], images.flip(2), images)
        padded = torch.nn.functional.pad(images, (self.shift,) * 4)  # (B, H + 2s, W + 2s)
        rows = offsets[0, :, None] + torch.arange(height, device=device)  # (B, H)
        columns = offsets[1, :, None] + torch.arange(width, device=device)  # (B, W)
        columns = torch.where(flips[:, None], columns.flip(1), columns)
        return padded[torch.arange(count, device=device)[:, None, None], rows[:, :, None], columns[:, None, :]]


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


def validation_split(labels: torch.Tensor, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the training images to train on and of `size` others to validate on, both ascending.

    Stratified: each class gives its share of `size` (largest remainders first), so the validation
    images have the training set's class mix. Seeded, from a generator of its own: the same labels,
    size and seed always hold out the same images, whatever else the run does.
    """
    if size == 0:
        return torch.arange(len(labels)), torch.arange(0)
    if size >= len(labels):
        raise ConfigError(f"--validation-size {size} leaves none of the {len(labels)} training images to train on")
    generator = torch.Generator().manual_seed(seed + SPLIT_SEED_OFFSET)
    counts = torch.bincount(labels)  # (C,)
    exact = counts.double() * size / len(labels)
    shares = exact.floor().long()
    remainders = (exact - shares).argsort(descending=True, stable=True)
    shares[remainders[: size - int(shares.sum())]] += 1
    held = [torch.nonzero(labels == label).flatten()[torch.randperm(int(count), generator=generator)[:share]]
            for label, (count, share) in enumerate(zip(counts.tolist(), shares.tolist()))]
    validation = torch.cat(held).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[validation] = False
    return torch.nonzero(keep).flatten(), validation


def batch_count(size: int, batch_size: int) -> int:
    """Batches per epoch, the last one possibly smaller (as DataLoader with drop_last=False)."""
    return -(-size // batch_size)
