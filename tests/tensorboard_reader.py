"""What a run directory holds, as TensorBoard's own reader sees it."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

# 0 keeps every event of each kind (the default keeps a sample of some kinds).
KEEP_ALL = {kind: 0 for kind in (event_accumulator.SCALARS, event_accumulator.IMAGES, event_accumulator.TENSORS,
                                 event_accumulator.HISTOGRAMS, event_accumulator.COMPRESSED_HISTOGRAMS,
                                 event_accumulator.AUDIO)}


def load_runs(log_dir: Path) -> EventMultiplexer:
    """Every TensorBoard run below `log_dir`, fully loaded."""
    multiplexer = EventMultiplexer(size_guidance=KEEP_ALL)
    multiplexer.AddRunsFromDirectory(str(log_dir))
    multiplexer.Reload()
    return multiplexer


def scalar_steps(multiplexer: EventMultiplexer, run: str, tag: str) -> list[int]:
    return [event.step for event in multiplexer.Scalars(run, tag)]


def image_steps(multiplexer: EventMultiplexer, run: str, tag: str) -> list[int]:
    return [event.step for event in multiplexer.Images(run, tag)]


def training_run(multiplexer: EventMultiplexer) -> str:
    """The name of the (single) training run: `train-<key>`."""
    names = [name for name in multiplexer.Runs() if Path(name).name.startswith("train-")]
    assert len(names) == 1, f"expected one training run, found {names}"
    return names[0]


def loss_steps(run_dir: Path) -> list[int]:
    """The steps of the training loss in the (single) training run under an experiment's run directory."""
    runs = load_runs(run_dir)
    return scalar_steps(runs, training_run(runs), "training loss")
