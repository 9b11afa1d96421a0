"""Training stage: the tutorial's loop on in-memory uint8 tensors, checkpointed and exactly resumable."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tasks import batches, model, rng
from tasks.caching import StageOutput, source_digest, stage_task
from tasks.checkpoint import CheckpointStore
from tasks.config import RunConfig
from tasks.data import CLASSES, fingerprint, load_split
from tasks.faults import fault_point
from tasks.figure_worker import FigureWorker
from tasks.files import digest_json, read_manifest, write_manifest
from tasks.log import stage_logger
from tasks.progress import StepProgress

LOSS_TAG, PREDICTIONS_TAG = "training loss", "predictions vs. actuals"
# Batches this small are bound by per-op overhead, where PyTorch's own convolutions beat oneDNN's
# (measured on 2 cores at batch 4: 0.56 against 1.16 ms a step).
ONEDNN_MIN_BATCH = 9


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

    @classmethod
    def of(cls, config: RunConfig) -> Hyperparameters:
        """The weights-deciding subset of a run's parameters."""
        return cls(**{field.name: getattr(config, field.name) for field in fields(cls)})


def training_dir(dataset: Path, run_dir: str, hyperparameters: Hyperparameters, device: str, **_: object) -> Path:
    """`<run>/train-<key>`: one folder, and one TensorBoard run, per set of weights-deciding inputs.

    The key covers the hyperparameters, the dataset's fingerprint, the device type and the code of
    the model, the batching and this loop; so a new learning rate trains into a new folder and
    never mixes its curve with another training's.
    """
    device_type = torch.device(device).type
    key = digest_json([asdict(hyperparameters), fingerprint(dataset), device_type, TRAINING_CODE])
    return Path(run_dir) / f"train-{key[:10]}"


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
    store = CheckpointStore(out / "checkpoints")
    found = None if refresh else store.latest()
    if found is None:
        # Nothing to resume: whatever is left in the folder belongs to a training that is being redone.
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    images, labels = load_split(dataset, "train")
    started = time.perf_counter()
    loop = TrainingLoop(hyperparameters, device, len(images))
    if found is not None:
        stage_logger().info("Resuming from %s (step %d)", found[0], found[1]["global_step"])
        loop.load_state(found[1])
    # purge_step drops the points that a killed run logged after its last checkpoint: no duplicates.
    writer = SummaryWriter(str(out), purge_step=loop.global_step + 1 if found else None, filename_suffix=".training")
    try:
        loop.run(images, labels, writer, store, log_every, checkpoint_every)
    finally:
        writer.close()
    final = store.paths()[-1]  # written at the last epoch's end: the finished training
    return write_manifest(
        manifest_path, [final], checkpoint=str(final.relative_to(out)), global_step=loop.global_step,
        hyperparameters=asdict(hyperparameters), device=device, seconds=round(time.perf_counter() - started, 3),
    )


class TrainingLoop:
    """Model, optimizer, schedule, data order and position: the whole state a checkpoint holds."""

    def __init__(self, hyperparameters: Hyperparameters, device: str, size: int) -> None:
        self.hp = hyperparameters
        self.device = torch.device(device)
        if self.device.type == "cpu":
            torch.set_num_threads(batches.cpu_threads(hyperparameters.batch_size))
        self.batches_per_epoch = batches.batch_count(size, hyperparameters.batch_size)
        self.model = model.build_model(model.MODEL_ARGS, seed=hyperparameters.seed).to(self.device)
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = _optimizer(self.model, hyperparameters, self.device)
        self.scheduler = _scheduler(self.optimizer, hyperparameters, self.batches_per_epoch)
        self.order = batches.SeededOrder(size, hyperparameters.seed)
        self.epoch = self.batches_done = self.global_step = 0
        self.order_state = self.order.state()
        self.running_loss = torch.zeros((), device=self.device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else {},
            "model_args": model.MODEL_ARGS,
            "hyperparameters": asdict(self.hp),
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "global_step": self.global_step,
            "order": self.order_state,
            "rng": rng.capture(self.device),
            "running_loss": self.running_loss.cpu(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.batches_done, self.global_step = state["epoch"], state["batches_done"], state["global_step"]
        self.order_state = state["order"]
        self.order.restore(self.order_state)
        rng.restore(state["rng"], self.device)
        self.running_loss = state["running_loss"].to(self.device)

    def run(
        self, images: torch.Tensor, labels: torch.Tensor, writer: SummaryWriter, store: CheckpointStore,
        log_every: int, checkpoint_every: int,
    ) -> None:
        """Train from the current position to the last epoch, logging and checkpointing on the way."""
        images, labels = images.to(self.device), labels.to(self.device)  # 47 MB of uint8: one copy, then index
        progress = StepProgress("train", total=self.hp.epochs * self.batches_per_epoch, done=self.global_step)
        figures = FigureWorker(writer, PREDICTIONS_TAG, CLASSES)
        self.model.train()
        with closing(progress), closing(figures), onednn(enabled=self.hp.batch_size >= ONEDNN_MIN_BATCH):
            while self.epoch < self.hp.epochs:
                permutation = self.order.next_epoch().to(self.device)
                for batch in range(self.batches_done, self.batches_per_epoch):
                    index = permutation[batch * self.hp.batch_size:(batch + 1) * self.hp.batch_size]
                    raw, targets = images[index], labels[index]  # (B, 28, 28) uint8, (B,)
                    inputs = self._step(raw, targets)
                    self.batches_done = batch + 1
                    progress.advance()
                    if self.global_step % log_every == 0:
                        self._log_point(writer, figures, progress, raw, inputs, targets, log_every)
                    if self.global_step % checkpoint_every == 0:
                        self._checkpoint(writer, figures, store)
                self.epoch, self.batches_done = self.epoch + 1, 0
                self.order_state = self.order.state()
                self._checkpoint(writer, figures, store)

    def _step(self, raw: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch of uint8 images; returns the normalised inputs (B, 1, 28, 28)."""
        fault_point("train", self.global_step + 1)
        inputs = batches.normalise(raw, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.criterion(self.model(inputs), targets)
        loss.backward()
        self.optimizer.step()
        if self.scheduler:
            self.scheduler.step()
        self.running_loss += loss.detach()  # stays on the device: no host sync per step
        self.global_step += 1
        return inputs

    def _log_point(
        self, writer: SummaryWriter, figures: FigureWorker, progress: StepProgress, raw: torch.Tensor,
        inputs: torch.Tensor, targets: torch.Tensor, log_every: int,
    ) -> None:
        """Average loss since the last point, and the tutorial's figure on this batch (at most 4 images)."""
        average = self.running_loss.item() / log_every  # note: a host sync, once per log_every steps
        self.running_loss.zero_()
        writer.add_scalar(LOSS_TAG, average, self.global_step)
        progress.note(loss=average)
        with torch.no_grad():
            self.model.eval()
            probabilities = torch.softmax(self.model(inputs[:4]), dim=1)  # (4, C)
            self.model.train()
        figures.log(self.global_step, raw[:4].cpu().numpy(), probabilities.cpu().numpy(), targets[:4].cpu().numpy())

    def _checkpoint(self, writer: SummaryWriter, figures: FigureWorker, store: CheckpointStore) -> None:
        # Events first: every point up to this step must be on disk before a resume may start here.
        figures.flush()
        writer.flush()
        store.save(self.state_dict())


@contextmanager
def onednn(enabled: bool) -> Iterator[None]:
    """Use oneDNN's CPU kernels, or PyTorch's own, within the block.

    torch.backends.mkldnn.flags() does the same but also sets oneDNN's TF32 flag, which warns on every
    CPU-only build; this touches the one setting needed.
    """
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


def _optimizer(net: nn.Module, hp: Hyperparameters, device: torch.device) -> torch.optim.Optimizer:
    # Fused: one kernel updates every parameter, instead of a few small ops per parameter tensor
    # (about 8% of a batch-4 step on the CPU).
    fused = device.type in ("cpu", "cuda")
    if hp.optimizer == "adam":
        return torch.optim.Adam(net.parameters(), lr=hp.lr, betas=(hp.momentum, 0.999), fused=fused)
    return torch.optim.SGD(net.parameters(), lr=hp.lr, momentum=hp.momentum, fused=fused)


def _scheduler(
    optimizer: torch.optim.Optimizer, hp: Hyperparameters, batches_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    if hp.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=hp.epochs * batches_per_epoch)
    return None


TRAINING_CODE = source_digest(model, batches, sys.modules[__name__])
train_task = stage_task(
    train,
    name="train",
    output=training_output,
    code=TRAINING_CODE,
    ignore=("log_every", "checkpoint_every"),  # they change what is logged and saved, never the weights
    retries=2,  # a retry resumes from the newest checkpoint, so it costs minutes, not the run
)
