"""The predictions figures drawn in a child process: the same pictures, at their steps, and a clear error when it dies."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from fashion_pipeline.tasks.ml.dataset import CLASSES
from fashion_pipeline.tasks.ml.figures import PredictionsFigure
from fashion_pipeline.tasks.plumbing.figure_worker import MAX_PENDING, FigureWorker
from tests.tensorboard_reader import load_runs

TAG = "predictions vs. actuals"


def batch(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Four uint8 images, their class probabilities and labels."""
    rng = np.random.default_rng(seed)
    probabilities = rng.random((4, len(CLASSES)))
    return rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), probabilities / probabilities.sum(1, keepdims=True), \
        rng.integers(0, len(CLASSES), 4)


def test_figures_land_at_their_steps_as_drawn_in_process(tmp_path: Path) -> None:
    steps = list(range(10, 10 * (3 * MAX_PENDING + 1), 10))  # more than MAX_PENDING between flushes
    with SummaryWriter(str(tmp_path)) as writer:
        worker = FigureWorker(writer, TAG, CLASSES)
        try:
            for step in steps:
                worker.log(step, *batch(step))
            worker.flush()
        finally:
            worker.close()
    logged = load_runs(tmp_path).Images(".", TAG)
    assert [event.step for event in logged] == steps
    expected = PredictionsFigure(CLASSES).render(*batch(steps[-1]))  # (H, W, 3)
    drawn = np.asarray(Image.open(io.BytesIO(logged[-1].encoded_image_string)).convert("RGB"))
    assert (logged[-1].height, logged[-1].width) == expected.shape[:2]
    assert np.array_equal(drawn, expected)


def test_a_dead_worker_is_an_error_not_a_hang(tmp_path: Path) -> None:
    with SummaryWriter(str(tmp_path)) as writer:
        worker = FigureWorker(writer, TAG, CLASSES)
        worker.process.kill()
        with pytest.raises(RuntimeError, match="the figure process exited"):
            for step in range(MAX_PENDING + 1):
                worker.log(step, *batch(step))
            worker.flush()
        worker.close()
