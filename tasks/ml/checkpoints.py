"""Training checkpoints: atomic, rotated, self-describing, loaded safely, older formats upgraded.

torch is imported on the first save or load: a cached rerun, which only reads manifests, never imports it.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any, BinaryIO

from fashion_pipeline.tasks.plumbing.failures import PermanentError, flat
from fashion_pipeline.tasks.plumbing.files import atomic_write, nearest_existing
from fashion_pipeline.tasks.plumbing.log import stage_logger

# `epoch` is the epoch in progress and `batches_done` how many of its batches are done;
# a checkpoint written at an epoch's end has epoch + 1 and batches_done 0.
CHECKPOINT_KEYS = frozenset({
    "format", "model", "optimizer", "scheduler", "model_args", "hyperparameters", "epoch", "batches_done",
    "global_step", "order", "rng", "running_loss", "augment", "last_loss", "validation", "threads",
})
# The checkpoint format: 1, the keys above but `format` and `augment` (written before the format was
# recorded); 2, with `format`; 3, with `augment` (the augmentation generator's state, empty without
# augmentation); 4, with `last_loss` and `validation` (the latest logged loss and validation, which a
# training resumed at its end still reports); 5, with `threads` (the CPU threads it trains with, kept
# wherever it resumes) and a checksum file beside it (`checksum_file`), which loading requires. A later format that adds a key fills it in for older checkpoints in
# `_upgraded`, so that they still resume.
FORMAT = 5
# model.pt, for inference; its metrics are the training's (the test set's are in metrics.json beside it).
MODEL_KEYS = ("format", "model", "model_args", "hyperparameters", "epoch", "global_step", "metrics")


class CheckpointFormatError(PermanentError):
    """A checkpoint written by a newer version of this project: resuming from it needs that version."""


class CheckpointStore:
    """Numbered checkpoints `step-NNNNNNNN.pt` in one folder: the last in sorted order is the newest."""

    def __init__(self, folder: Path, keep: int = 3) -> None:
        self.folder = Path(folder)
        self.keep = keep

    def paths(self) -> list[Path]:
        return sorted(self.folder.glob("step-*.pt"))

    @staticmethod
    def step_of(path: Path) -> int:
        """The global step a checkpoint file was written at, from its name."""
        return int(path.stem.removeprefix("step-"))

    def save(self, state: dict[str, Any]) -> Path:
        """Write `state` atomically, after its checksum file, then drop all but the newest `keep` checkpoints.

        The checksum first: a run killed between the two leaves a checksum without its checkpoint,
        never a checkpoint that cannot be verified.
        """
        path = self.folder / f"step-{state['global_step']:08d}.pt"
        data = _serialised(state)
        path.unlink(missing_ok=True)  # saved again (an epoch ending on a checkpoint step): never beside a new checksum
        atomic_write(checksum_file(path), lambda stream: stream.write(hashlib.sha256(data).hexdigest().encode()))
        atomic_write(path, lambda stream: stream.write(data))
        for old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
            checksum_file(old).unlink(missing_ok=True)
        return path

    def warn_if_short_of_space(self, state: dict[str, Any]) -> None:
        """Warn when the folder has less free space than checkpoints like `state` need: the `keep` newest,
        the one being written and the exported model.pt. A warning, not a refusal: space may be freed meanwhile."""
        size = len(_serialised(state))
        needed = (self.keep + 2) * size
        free = shutil.disk_usage(nearest_existing(self.folder)).free
        if free < needed:
            stage_logger().warning("%s has %.1f MB free, less than the %.1f MB this training's checkpoints need: "
                                   "it will stop when the disk is full (and resume once space is freed)",
                                   self.folder, free / 1e6, needed / 1e6)

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that loads and has the expected keys; broken ones are passed over with a warning."""
        for path in reversed(self.paths()):
            try:
                return path, load_checkpoint(path)
            except CheckpointFormatError:
                raise  # a good checkpoint, newer than this code: never to be trained over
            except FileNotFoundError:
                continue  # gone since the folder was listed
            except OSError:
                # The disk, not the file (EIO, EACCES, a stale NFS handle): passing over every checkpoint
                # would start the training over and delete them all; a retry, later, may read them.
                raise
            except Exception as error:  # a truncated zip, a pickle error, wrong keys: all mean "unusable"
                stage_logger().warning("Skipping unusable checkpoint %s: %s", path, flat(str(error))[:200])
        return None


def checksum_file(checkpoint: Path) -> Path:
    """Where a checkpoint's sha256 is kept: `step-NNNNNNNN.pt.sha256` beside it."""
    return checkpoint.with_name(checkpoint.name + ".sha256")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a training checkpoint as data only (`weights_only=True`: no code runs), in today's format,
    after checking its bytes against its checksum file (torch.load accepts most flipped bytes).

    An older format is upgraded; a newer one is refused with CheckpointFormatError, naming it. A
    damaged checkpoint, or one of format 5 or later without its checksum, raises ValueError.
    """
    data = path.read_bytes()
    try:
        expected = checksum_file(path).read_text().strip()
    except FileNotFoundError:
        expected = None
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(f"its bytes do not match {checksum_file(path).name}: the file is damaged")
    state = _parse(data)
    if expected is None and isinstance(state, dict) and state.get("format", 1) >= 5:
        raise ValueError(f"{checksum_file(path).name} is missing, so it cannot be verified")
    if isinstance(state, dict):
        state = _upgraded(state, path)
    if not isinstance(state, dict) or set(state) != CHECKPOINT_KEYS:
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"not a training checkpoint: keys {found}")
    return state


def _upgraded(state: dict[str, Any], path: Path) -> dict[str, Any]:
    version = state.get("format", 1)
    if not isinstance(version, int):
        raise ValueError(f"not a checkpoint format: {version!r}")
    if version > FORMAT:
        raise CheckpointFormatError(f"{path}: checkpoint format {version} is newer than this code reads ({FORMAT}): "
                                    "run the version of the project that wrote it, or --refresh train")
    if version < 3:  # trained without augmentation, which came with format 3
        state = state | {"augment": _empty_tensor()}
    if version < 4:  # not kept: set again at the next log point and epoch end (or, at the end, validated again)
        state = state | {"last_loss": None, "validation": None}
    if version < 5:  # trained with the thread count of its machine then: it goes on with this one's
        state = state | {"threads": None}
    return state | {"format": FORMAT}


def _empty_tensor() -> Any:
    import torch

    return torch.empty(0, dtype=torch.uint8)


def load_model_file(model_manifest: Path) -> dict[str, Any]:
    """The exported model file named by `model_manifest`, loaded as data only."""
    facts = json.loads(Path(model_manifest).read_text())
    return _load(Path(model_manifest).parent / facts["model"])


def save_file(value: dict[str, Any], path: Path) -> Path:
    """Save a checkpoint or model file atomically: a reader, or a run killed half-way, sees the old or the new one."""
    return atomic_write(path, lambda stream: _save(value, stream))


def _save(value: dict[str, Any], stream: BinaryIO) -> None:
    import torch

    torch.save(value, stream)


def _serialised(value: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    _save(value, buffer)
    return buffer.getvalue()


def _load(path: Path) -> dict[str, Any]:
    """A checkpoint or model file, as data only (`weights_only=True`: no code runs), onto the CPU.

    Read whole, then parsed: torch.load on the file itself raises OSError for some truncated ones,
    so here an OSError always means the disk (see CheckpointStore.latest).
    """
    return _parse(path.read_bytes())


def _parse(data: bytes) -> dict[str, Any]:
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
