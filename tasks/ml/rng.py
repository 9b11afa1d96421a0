"""Capture and restore every random state that can decide the weights, as plain tensors and lists."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture(device: torch.device) -> dict[str, Any]:
    """torch's CPU state, the training GPU's (if `device` is one), numpy's and python's random states,
    as tensors and lists that `torch.load(weights_only=True)` reads back."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": position,
                  "has_gauss": has_gauss, "gauss": gauss},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def restore(states: dict[str, Any], device: torch.device) -> None:
    """Put back the states from `capture()`; the GPU's onto `device` when training there."""
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and states["cuda"].numel():
        torch.cuda.set_rng_state(states["cuda"], device)
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
