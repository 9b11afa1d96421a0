"""Training stage: the training's keyed folder and its manifest; the loop itself is in tasks/training_loop.py."""

from __future__ import annotations

import importlib.metadata
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from tasks.caching import StageOutput, source_digest, stage_task
from tasks.config import RunConfig
from tasks.data import fingerprint
from tasks.devices import cpu_threads, device_type
from tasks.files import digest_json, read_manifest

LOSS_TAG, PREDICTIONS_TAG = "training loss", "predictions vs. actuals"
VALIDATION_LOSS_TAG, VALIDATION_ACCURACY_TAG = "validation loss", "validation accuracy"
KEY_FILE = "key.json"  # in each training's folder: what its name is the digest of
TORCH_VERSION = importlib.metadata.version("torch")  # read, not imported: a cached rerun never imports torch


@dataclass(frozen=True)
class Hyperparameters:
    """Everything besides data, code and device that decides the trained weights."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    optimizer: str
    schedule: str
    seed: int
    validation_size: int = 0  # training images held out for validation (tasks/batches.py: validation_split)
    augment: bool = False  # random shifts and flips of the training images (tasks/batches.py: Augmentation)
    label_smoothing: float = 0.0

    @classmethod
    def of(cls, config: RunConfig) -> Hyperparameters:
        """The weights-deciding subset of a run's parameters."""
        return cls(**{field.name: getattr(config, field.name) for field in fields(cls)})


def training_dir(dataset: Path, run_dir: str, hyperparameters: Hyperparameters, device: str, **_: object) -> Path:
    """`<run>/train-<key>`: one folder, and one TensorBoard run, per set of weights-deciding inputs.

    The key covers the hyperparameters, the dataset's fingerprint, the device type, the code of the
    model, the batching and the loop, torch's version, and on the CPU the thread count where more
    than one thread splits the work (and so the order of floating-point sums); so a new learning
    rate, a torch upgrade or another machine's core count trains into a new folder and never mixes
    its curve, or its resume, with another training's.
    """
    return Path(run_dir) / f"train-{digest_json(training_key(dataset, hyperparameters, device))[:10]}"


def training_key(dataset: Path, hyperparameters: Hyperparameters, device: str) -> dict[str, Any]:
    """What decides a training's weights, as JSON values: its folder's name is their digest."""
    kind = device_type(device)
    threads = cpu_threads(hyperparameters.batch_size) if kind == "cpu" else 1
    return {"hyperparameters": asdict(hyperparameters), "dataset": fingerprint(dataset), "device_type": kind,
            "code": TRAINING_CODE, "torch": TORCH_VERSION, "threads": threads}


def training_output(**inputs: Any) -> StageOutput:
    """The training manifest in its keyed folder; the folder's key already covers every input."""
    return training_dir(**inputs) / "training.json", {}


def train(
    dataset: Path,
    run_dir: str,
    hyperparameters: Hyperparameters,
    device: str,
    log_every: int = 1000,
    checkpoint_every: int = 2000,
    refresh: bool = False,
) -> Path:
    """Train the Net, resuming from the newest valid checkpoint of the same training if there is one.

    Args:
        dataset: the dataset manifest from the download stage.
        run_dir: the experiment's run directory.
        hyperparameters: the weights-deciding settings.
        device: a resolved device ("cpu", "cuda", "cuda:1", "mps").
        log_every: steps per 'training loss' point and 'predictions vs. actuals' figure.
        checkpoint_every: steps between checkpoints; one is also written at each epoch's end.
        refresh: discard this training's checkpoints and events and train from scratch.

    Returns:
        The training manifest, naming the final checkpoint.
    """
    out = training_dir(dataset, run_dir, hyperparameters, device)
    manifest_path = out / "training.json"
    if not refresh and read_manifest(manifest_path):
        return manifest_path
    from tasks.training_loop import run_training  # torch: imported only when there is training to do

    return run_training(dataset, out, hyperparameters, device, log_every, checkpoint_every, refresh)


TRAINING_CODE = source_digest("tasks.model", "tasks.batches", "tasks.training_loop", __name__)
train_task = stage_task(
    train,
    name="train",
    output=training_output,
    code=TRAINING_CODE,
    ignore=("log_every", "checkpoint_every"),  # they change what is logged and saved, never the weights
    retries=2,  # a retry resumes from the newest checkpoint, so it costs minutes, not the run
)
