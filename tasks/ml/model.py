"""The tutorial's LeNet-style network for 28x28 grey images."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fashion_pipeline.tasks.ml import batches

# The arguments of the Fashion-MNIST model: grey images, ten classes.
MODEL_ARGS: dict[str, int] = {"in_channels": 1, "num_classes": 10}


class Net(nn.Module):
    """Two conv+pool blocks and three linear layers, as in the TensorBoard tutorial."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))  # (B, 6, 12, 12)
        x = self.pool(F.relu(self.conv2(x)))  # (B, 16, 4, 4)
        x = torch.flatten(x, 1)  # (B, 256)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)  # (B, num_classes) logits


def build_model(model_args: dict[str, Any], seed: int | None = None) -> Net:
    """A Net from its recorded arguments; `seed` fixes the initial weights."""
    if seed is not None:
        torch.manual_seed(seed)
    return Net(**model_args)


def log_probabilities(net: nn.Module, inputs: torch.Tensor, mirrored: bool = False) -> torch.Tensor:
    """Log-softmax class probabilities (B, C) of `net` on normalised images (B, 1, H, W).

    With `mirrored` (the test-time flip), those of the mean of each image's and its mirror image's
    probabilities: a model trained on flipped images sees both views of a garment, whose class a
    mirror never changes.
    """
    log_p = torch.log_softmax(net(inputs), dim=1)
    if mirrored:
        log_p = torch.logaddexp(log_p, torch.log_softmax(net(inputs.flip(3)), dim=1)) - math.log(2)
    return log_p


def predicted_log_probabilities(net: nn.Module, images: torch.Tensor, device: torch.device | str, mirrored: bool,
                                each: Callable[[], None] | None = None) -> torch.Tensor:
    """`log_probabilities` (N, C) on `device` of uint8 images (N, 28, 28), in inference batches, with `net`
    in eval mode and no gradients; `each` is called after every batch (a progress bar)."""
    was_training = net.training
    net.eval()
    log_p = []
    with torch.no_grad():
        for chunk in images.split(batches.INFERENCE_BATCH):
            log_p.append(log_probabilities(net, batches.normalise(chunk, device), mirrored))
            if each:
                each()
    net.train(was_training)
    return torch.cat(log_p)
