"""The training loop on in-memory uint8 tensors: checkpointed, logged to TensorBoard, exactly resumable."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from fashion_pipeline.tasks.ml import batches, checkpoints, model, rng
from fashion_pipeline.tasks.ml.checkpoints import CheckpointStore, load_checkpoint
from fashion_pipeline.tasks.ml.dataset import CLASSES, load_split
from fashion_pipeline.tasks.ml.devices import cpu_threads
from fashion_pipeline.tasks.ml.hyperparameters import Hyperparameters
from fashion_pipeline.tasks.plumbing.failures import one_line
from fashion_pipeline.tasks.plumbing.faults import fault_point
from fashion_pipeline.tasks.plumbing.figure_worker import FigureWorker
from fashion_pipeline.tasks.plumbing.files import Written, atomic_write_json, naming
from fashion_pipeline.tasks.plumbing.log import stage_logger
from fashion_pipeline.tasks.plumbing.progress import StepProgress

LOSS_TAG, PREDICTIONS_TAG = "training loss", "predictions vs. actuals"
VALIDATION_LOSS_TAG, VALIDATION_ACCURACY_TAG = "validation loss", "validation accuracy"
KEY_FILE = "key.json"  # in each training's folder: what its name is the digest of

# Batches this small are bound by per-op overhead, where PyTorch's own convolutions beat oneDNN's.
ONEDNN_MIN_BATCH = 9


LOG_EVERY = 1000  # steps per log point, unless an epoch is shorter than ten of them
POINTS_PER_EPOCH = 10


def default_log_every(batches_per_epoch: int) -> int:
    """Steps per log point when none is asked for: LOG_EVERY, or fewer where an epoch would otherwise
    log fewer than POINTS_PER_EPOCH points (large batches, small data), so every training has a curve."""
    return max(1, min(LOG_EVERY, batches_per_epoch // POINTS_PER_EPOCH))


def run_training(
    dataset: Path, out: Path, key: dict[str, Any], hyperparameters: Hyperparameters, device: str,
    log_every: int | None, checkpoint_every: int, refresh: bool, sync: Callable[[], None] = lambda: None,
) -> Written:
    """Train into `out`, resuming from its newest valid checkpoint unless `refresh`; returns the final checkpoint.

    Without a checkpoint of its own, a training continues an earlier one of the same run that
    differs only in its epoch count (see `continue_shorter`). The arguments are those of the train
    stage (tasks/train.py), with `out` the training's keyed folder, `key` what its name is the digest
    of, and `sync` called once the folder is set up, after every checkpoint and at the end (to
    publish it to a store).
    """
    store = CheckpointStore(out / "checkpoints")
    found = None if refresh else store.latest()
    if found is None:
        # Nothing to resume: whatever is left in the folder belongs to a training that is being redone.
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / KEY_FILE, key)  # for later trainings that may continue this one

    images, labels = load_split(dataset, "train")
    validation = None
    if hyperparameters.validation_size:
        kept, held = batches.validation_split(labels, hyperparameters.validation_size, hyperparameters.seed)
        validation, images, labels = (images[held], labels[held]), images[kept], labels[kept]
    started = time.perf_counter()
    loop = TrainingLoop(hyperparameters, device, len(images))
    if found is None and not refresh:
        found = continue_shorter(out, key, store, loop.batches_per_epoch)
    elif found is not None:
        stage_logger().info("Resuming from %s (step %d)", found[0], found[1]["global_step"])
    if found is not None:
        loop.load_state(found[1])
    log_every = log_every or default_log_every(loop.batches_per_epoch)
    store.warn_if_short_of_space(loop.state_dict())
    sync()
    # purge_step drops the points that a killed run logged after its last checkpoint: no duplicates.
    writer = SummaryWriter(str(out), purge_step=loop.global_step + 1 if found else None, filename_suffix=".training")
    with naming(out):  # TensorBoard's writer says which error, not where
        try:
            loop.run(images, labels, writer, store, log_every, checkpoint_every, validation, sync)
        finally:
            writer.close()
    sync()  # the events as the closed writer left them
    final = store.paths()[-1]  # written at the last epoch's end: the finished training
    checksum = checkpoints.checksum_file(final)  # absent only beside a checkpoint of an older format
    return Written([final, *([checksum] if checksum.exists() else [])], {
        "checkpoint": str(final.relative_to(out)), "global_step": loop.global_step, "training_loss": loop.last_loss,
        "validation": loop.validation, "hyperparameters": asdict(hyperparameters), "device": device,
        "seconds": round(time.perf_counter() - started, 3),
    })


def continue_shorter(out: Path, key: dict[str, Any], store: CheckpointStore,
                     batches_per_epoch: int) -> tuple[Path, dict[str, Any]] | None:
    """Continue, in `out`, an earlier training whose key differs from `key` only in its epoch count.

    With a constant learning rate, nothing before an epoch's end depends on how many epochs follow:
    the data order of each epoch is drawn from one seeded generator, and every other state is in the
    checkpoint. So the earlier training's checkpoint at their last shared epoch boundary is exactly
    this training's state there. It is copied into `store`, with its TensorBoard events (purged
    beyond it on resume), and the earlier training is left as it was. A one-cycle schedule depends
    on the total, so such a training starts over, and says so.

    Returns the copied checkpoint and its state, or None.
    """
    epochs = key["hyperparameters"]["epochs"]
    best: tuple[int, Path] | None = None  # the furthest shared epoch boundary: (step, checkpoint)
    for folder in sorted(out.parent.glob("train-*")):
        try:
            theirs = json.loads((folder / KEY_FILE).read_text())
            same = folder != out and theirs | {"hyperparameters": theirs["hyperparameters"] | {"epochs": epochs}} == key
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not same:
            continue
        if key["hyperparameters"]["schedule"] != "constant":
            stage_logger().info("Starting over instead of continuing %s: the %s schedule depends on the epoch count",
                                folder, key["hyperparameters"]["schedule"])
            return None
        boundaries = [(step, path) for path in CheckpointStore(folder / "checkpoints").paths()
                      if (step := CheckpointStore.step_of(path)) % batches_per_epoch == 0
                      and 0 < step <= epochs * batches_per_epoch]
        if boundaries and (best is None or boundaries[-1][0] > best[0]):
            best = boundaries[-1]
    if best is None:
        return None
    step, source = best
    try:
        state = load_checkpoint(source)
    except Exception as error:  # noqa: BLE001  (unusable, or of a newer format: this training starts over)
        stage_logger().info("Starting over instead of continuing %s: %s", source, one_line(error))
        return None
    if state["batches_done"] != 0 or state["epoch"] * batches_per_epoch != step:
        return None  # not the epoch's end after all
    state["hyperparameters"] = key["hyperparameters"]
    for events in source.parent.parent.glob("events.out.tfevents.*.training"):
        shutil.copy2(events, out / events.name)
    stage_logger().info("Continuing from %s (epoch %d, step %d): the first epochs of this training are that one's",
                        source, state["epoch"], step)
    return store.save(state), state


class TrainingLoop:
    """Model, optimizer, schedule, data order and position: the whole state a checkpoint holds."""

    def __init__(self, hyperparameters: Hyperparameters, device: str, size: int) -> None:
        self.hp = hyperparameters
        self.device = torch.device(device)
        # The CPU threads split sums, and so decide their rounding: a training keeps the count it started
        # with (its checkpoints hold it), wherever it resumes.
        self.threads = cpu_threads(hyperparameters.batch_size) if self.device.type == "cpu" else 1
        self._use_threads()
        self.batches_per_epoch = batches.batch_count(size, hyperparameters.batch_size)
        self.model = model.build_model(model.MODEL_ARGS, seed=hyperparameters.seed).to(self.device)
        self.use_onednn = self.device.type == "cpu" and hyperparameters.batch_size >= ONEDNN_MIN_BATCH
        if self.use_onednn:
            # oneDNN's convolutions work in channels-last order: weights kept in it spare a reorder of
            # every layer's activations and gradients at each step.
            self.model.to(memory_format=torch.channels_last)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=hyperparameters.label_smoothing)
        self.augment = (batches.Augmentation(hyperparameters.seed, hyperparameters.augment_shift)
                        if hyperparameters.augment else None)
        self.optimizer = _optimizer(self.model, hyperparameters, self.device)
        self.scheduler = _scheduler(self.optimizer, hyperparameters, self.batches_per_epoch)
        self.order = batches.SeededOrder(size, hyperparameters.seed)
        self.epoch = self.batches_done = self.global_step = 0
        self.order_state = self.order.state()
        self.running_loss = torch.zeros((), device=self.device)
        self.last_loss: float | None = None  # the mean loss at the latest log point
        self.validation: dict[str, float] | None = None  # loss and accuracy at the latest epoch's end

    def _use_threads(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads)

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": checkpoints.FORMAT,
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
            "augment": self.augment.state() if self.augment else torch.empty(0, dtype=torch.uint8),
            "last_loss": self.last_loss,
            "validation": self.validation,
            "threads": self.threads,
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
        if self.augment and state["augment"].numel():
            self.augment.restore(state["augment"])
        self.running_loss = state["running_loss"].to(self.device)
        self.last_loss, self.validation = state["last_loss"], state["validation"]
        if state["threads"]:
            self.threads = state["threads"]
            self._use_threads()

    def run(
        self, images: torch.Tensor, labels: torch.Tensor, writer: SummaryWriter, store: CheckpointStore,
        log_every: int, checkpoint_every: int, validation: tuple[torch.Tensor, torch.Tensor] | None = None,
        sync: Callable[[], None] = lambda: None,
    ) -> None:
        """Train from the current position to the last epoch, logging and checkpointing on the way;
        validate on `validation` (uint8 images and labels held out of `images`) at each epoch's end;
        call `sync` after each checkpoint."""
        images, labels = images.to(self.device), labels.to(self.device)  # 47 MB of uint8: one copy, then index
        progress = StepProgress("train", total=self.hp.epochs * self.batches_per_epoch, done=self.global_step)
        figures = FigureWorker(writer, PREDICTIONS_TAG, CLASSES)
        self.model.train()
        with closing(progress), closing(figures), onednn(enabled=self.use_onednn):
            while self.epoch < self.hp.epochs:
                permutation = self.order.next_epoch().to(self.device)
                for batch in range(self.batches_done, self.batches_per_epoch):
                    index = permutation[batch * self.hp.batch_size:(batch + 1) * self.hp.batch_size]
                    raw, targets = images[index], labels[index]  # (B, 28, 28) uint8, (B,)
                    if self.augment:  # here, so that the figure shows the images as trained on
                        raw = self.augment(raw)
                    inputs = self._step(raw, targets)
                    self.batches_done = batch + 1
                    progress.advance()
                    if self.global_step % log_every == 0:
                        self._log_point(writer, figures, progress, raw, inputs, targets, log_every)
                    if self.global_step % checkpoint_every == 0:
                        self._checkpoint(writer, figures, store)
                        sync()
                self.epoch, self.batches_done = self.epoch + 1, 0
                self.order_state = self.order.state()
                if validation is not None:
                    self._validate(*validation)
                    self._log_validation(writer)
                self._checkpoint(writer, figures, store)
                sync()
            if validation is not None and self.validation is None:
                # Resumed at the end from a checkpoint older than format 4, which did not keep it: the
                # same weights give the same figures, whose points the event file has already.
                self._validate(*validation)

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
        self.last_loss = average
        self.running_loss.zero_()
        writer.add_scalar(LOSS_TAG, average, self.global_step)
        progress.note(loss=average)
        with torch.no_grad():
            self.model.eval()
            probabilities = model.log_probabilities(self.model, inputs[:4], self.hp.test_time_flip).exp()  # (4, C)
            self.model.train()
        figures.log(self.global_step, raw[:4].cpu().numpy(), probabilities.cpu().numpy(), targets[:4].cpu().numpy())

    def _validate(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Loss and accuracy on the held-out uint8 images (N, 28, 28), into `self.validation`.

        No randomness is drawn and no state changes: a validated training trains the same weights.
        """
        log_p = model.predicted_log_probabilities(self.model, images, self.device, self.hp.test_time_flip)  # (N, C)
        targets = labels.to(self.device)
        # Plain cross-entropy, without the training's label smoothing.
        loss = nn.functional.nll_loss(log_p, targets).item()
        correct = (log_p.argmax(dim=1) == targets).sum().item()
        self.validation = {"validation_loss": loss, "validation_accuracy": correct / len(images)}

    def _log_validation(self, writer: SummaryWriter) -> None:
        """The latest validation, at the epoch's last step."""
        writer.add_scalar(VALIDATION_LOSS_TAG, self.validation["validation_loss"], self.global_step)
        writer.add_scalar(VALIDATION_ACCURACY_TAG, self.validation["validation_accuracy"], self.global_step)

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
    # Fused: one kernel updates every parameter, instead of a few small ops per parameter tensor.
    fused = device.type in ("cpu", "cuda")
    if hp.optimizer == "adam":
        return torch.optim.Adam(net.parameters(), lr=hp.lr, betas=(hp.momentum, 0.999), fused=fused,
                                weight_decay=hp.weight_decay, decoupled_weight_decay=True)
    return torch.optim.SGD(net.parameters(), lr=hp.lr, momentum=hp.momentum, fused=fused, weight_decay=hp.weight_decay)


def _scheduler(
    optimizer: torch.optim.Optimizer, hp: Hyperparameters, batches_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    if hp.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=hp.epochs * batches_per_epoch)
    return None
