"""The train stage: the training's keyed folder, so that each set of weights-deciding inputs trains once.

The loop itself is plain PyTorch, in tasks/ml/training_loop.py.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fashion_pipeline.tasks.ml.dataset import fingerprint
from fashion_pipeline.tasks.ml.devices import device_type
from fashion_pipeline.tasks.ml.hyperparameters import Hyperparameters
from fashion_pipeline.tasks.plumbing import storage
from fashion_pipeline.tasks.plumbing.files import digest_json
from fashion_pipeline.tasks.stage import StageOutput, Written, stage

TORCH_VERSION = importlib.metadata.version("torch")  # read, not imported: a cached rerun never imports torch
# The modules that decide the weights, besides this one: part of each training's key.
TRAINING_MODULES = ("ml.model", "ml.batches", "ml.hyperparameters", "ml.training_loop")
# What a training folder holds while it trains: in a store, these are published at every checkpoint.
TRAINING_FILES = ["key.json", "checkpoints/step-*.pt", "checkpoints/step-*.pt.sha256", "events.out.tfevents.*.training"]


def training_dir(dataset: Path, run_dir: str, hyperparameters: Hyperparameters, device: str, **_: object) -> Path:
    """`<run>/train-<key>`: one folder, and one TensorBoard run, per set of weights-deciding inputs.

    The key covers the hyperparameters, the dataset's fingerprint, the device type, the code of the
    model, the batching and the loop, and torch's version; so a new learning rate or a torch upgrade
    trains into a new folder and never mixes its curve, or its resume, with another training's. The
    CPU thread count is not in it: a training keeps the count it started with (in its checkpoints),
    so it resumes bitwise on a machine with other cores.
    """
    return keyed_folder(run_dir, training_key(dataset, hyperparameters, device))


def keyed_folder(run_dir: str, key: dict[str, Any]) -> Path:
    """The training folder of `key` in the run directory: its name is the key's digest."""
    return Path(run_dir) / f"train-{digest_json(key)[:10]}"


def training_key(dataset: Path, hyperparameters: Hyperparameters, device: str) -> dict[str, Any]:
    """What decides a training's weights, as JSON values: its folder's name is their digest."""
    return {"hyperparameters": asdict(hyperparameters), "dataset": fingerprint(dataset),
            "device_type": device_type(device), "code": train.code, "torch": TORCH_VERSION}


def training_output(**inputs: Any) -> StageOutput:
    """The training manifest in its keyed folder; the folder's key already covers every input."""
    return training_dir(**inputs) / "training.json", {}


@stage(
    "train",
    output=training_output,
    code=TRAINING_MODULES,
    ignore=("log_every", "checkpoint_every"),  # they change what is logged and saved, never the weights
    retries=2,  # a retry resumes from the newest checkpoint, so it costs minutes, not the run
)
def train(
    dataset: Path,
    run_dir: str,
    hyperparameters: Hyperparameters,
    device: str,
    log_every: int | None,
    checkpoint_every: int,
    refresh: bool = False,
) -> Written:
    """Train the Net, resuming from the newest valid checkpoint of the same training if there is one.

    Args:
        dataset: the dataset manifest from the download stage.
        run_dir: the experiment's run directory.
        hyperparameters: the weights-deciding settings.
        device: a resolved device ("cpu", "cuda", "cuda:1", "mps").
        log_every: steps per 'training loss' point and 'predictions vs. actuals' figure (None: the
            default, at most an epoch's steps / 10; see tasks/ml/training_loop.py).
        checkpoint_every: steps between checkpoints; one is also written at each epoch's end.
        refresh: discard this training's checkpoints and events and train from scratch.

    Returns:
        The final checkpoint, with the training's last loss, validation and timing.
    """
    from fashion_pipeline.tasks.ml.training_loop import (
        run_training,  # torch: imported only when there is training to do
    )

    key = training_key(dataset, hyperparameters, device)
    out = keyed_folder(run_dir, key)
    # In a store, the store's copy of the run's trainings is the truth: this one's checkpoints to resume
    # from (written on any machine), and the shorter ones it may continue.
    storage.pull(Path(run_dir), [f"train-*/{pattern}" for pattern in TRAINING_FILES])
    return run_training(dataset, out, key, hyperparameters, device, log_every, checkpoint_every, refresh,
                        sync=lambda: storage.push(out, TRAINING_FILES))
