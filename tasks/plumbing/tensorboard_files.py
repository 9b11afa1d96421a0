"""TensorBoard event files owned by one stage, so that a stage run again replaces its own events."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fashion_pipeline.tasks.plumbing.files import naming

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


def event_files(log_dir: Path, stage: str) -> list[Path]:
    """The event files that `stage` wrote in `log_dir`."""
    return sorted(Path(log_dir).glob(f"events.out.tfevents.*.{stage}"))


@contextmanager
def replacing_writer(log_dir: Path, stage: str) -> Iterator[SummaryWriter]:
    """A SummaryWriter for `stage`; when it closes cleanly, the stage's older event files are removed,
    so TensorBoard shows each of its points once. When it fails (a full disk, say), its own file is
    removed instead: no half-written events sit beside the stage's last complete ones."""
    from torch.utils.tensorboard import SummaryWriter  # here: torch is imported only by stages that write

    older = event_files(log_dir, stage)
    try:
        with naming(Path(log_dir)):  # TensorBoard's writer says which error, not where
            writer = SummaryWriter(str(log_dir), filename_suffix=f".{stage}")
            try:
                yield writer
            finally:
                writer.close()
    except BaseException:
        for path in set(event_files(log_dir, stage)) - set(older):
            path.unlink(missing_ok=True)
        raise
    for path in older:
        path.unlink(missing_ok=True)


def read_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """Every (step, value) of a scalar tag in `log_dir`, read with TensorBoard's own reader (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})  # 0: keep every event
    tensorboard_logger = logging.getLogger("tensorboard")
    level = tensorboard_logger.level
    tensorboard_logger.setLevel(logging.ERROR)  # its warning on purged steps: a resumed training, as intended
    try:
        accumulator.Reload()
    finally:
        tensorboard_logger.setLevel(level)
    if tag not in accumulator.Tags()[SCALARS]:
        return []
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]
