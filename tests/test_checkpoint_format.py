"""Checkpoint formats: today's loads as written, older ones are upgraded, newer ones are refused by name.

`fixtures/checkpoint-format-1.pt` is a real checkpoint of format 1 (written before checkpoints
recorded their format): the last one of a TINY training on the synthetic data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fashion_pipeline.tasks.ml.checkpoints import (
    CHECKPOINT_KEYS, FORMAT, MODEL_KEYS, CheckpointFormatError, CheckpointStore, load_checkpoint,
)
from fashion_pipeline.tasks.ml.hyperparameters import Hyperparameters
from fashion_pipeline.tasks.ml.training_loop import TrainingLoop
from tests.helpers import TINY, same_weights
from tests.synthetic import TRAIN_SIZE

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint-format-1.pt"


def test_format_1_checkpoint_loads_upgraded_and_resumes() -> None:
    state = load_checkpoint(FIXTURE)
    assert set(state) == CHECKPOINT_KEYS and state["format"] == FORMAT
    hyperparameters = Hyperparameters(**state["hyperparameters"])
    loop = TrainingLoop(hyperparameters, "cpu", TRAIN_SIZE)
    loop.load_state(state)
    assert (loop.epoch, loop.batches_done, loop.global_step) == (TINY["epochs"], 0, state["global_step"])
    assert all(torch.equal(loop.model.state_dict()[name], tensor) for name, tensor in state["model"].items())
    assert loop.state_dict()["format"] == FORMAT  # saved again, in today's format


def test_newer_format_is_refused_by_name_and_never_trained_over(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    newer = load_checkpoint(FIXTURE) | {"format": FORMAT + 1, "added_later": 1}
    store.save(newer)
    with pytest.raises(CheckpointFormatError, match=f"checkpoint format {FORMAT + 1} is newer than this code reads"):
        store.latest()


def test_unusable_checkpoint_is_still_passed_over(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    store.folder.mkdir()
    shutil.copyfile(FIXTURE, store.folder / "step-00000040.pt")
    torch.save({"model": {}}, store.folder / "step-00000080.pt")  # not a checkpoint
    # Cut just short of its end: torch.load on such a file itself raises OSError (EINVAL).
    (store.folder / "step-00000120.pt").write_bytes(FIXTURE.read_bytes()[:-10])
    path, state = store.latest()
    assert path.name == "step-00000040.pt" and state["format"] == FORMAT


def test_unreadable_checkpoint_fails_instead_of_starting_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    store = CheckpointStore(tmp_path / "checkpoints")
    store.folder.mkdir()
    shutil.copyfile(FIXTURE, store.folder / "step-00000040.pt")

    def unreadable(path: Path) -> bytes:
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(Path, "read_bytes", unreadable)
    with pytest.raises(OSError, match="Input/output error"):
        store.latest()  # not None, which would make the training start over and delete its folder
    assert (store.folder / "step-00000040.pt").exists()


def test_model_file_is_lean(finished_run: tuple[Path, dict]) -> None:
    train_dir = Path(finished_run[1]["train_dir"])
    exported = torch.load(train_dir / "model.pt", weights_only=True)
    assert set(exported) == set(MODEL_KEYS) and "optimizer" not in exported
    last = load_checkpoint(sorted((train_dir / "checkpoints").glob("step-*.pt"))[-1])
    assert same_weights(exported["model"], last["model"]) and exported["global_step"] == last["global_step"]
    loss_points = json.loads((train_dir / "training.json").read_text())["training_loss"]
    assert exported["metrics"] == {"training_loss": loss_points, "global_step": last["global_step"]}
    assert isinstance(loss_points, float)
