"""The training's "predictions vs. actuals" figures, drawn in a child process so that training never waits for them.

Matplotlib holds the GIL while it draws a figure and its PNG, so a thread would still
stall the training loop; a child process draws on another core. The loop hands over the few numbers
a figure needs and goes on; each PNG goes into the training's event file at the next log point, and
all of them before each checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any

from fashion_pipeline.tasks.plumbing.child_process import child_arguments, start_child
from fashion_pipeline.tasks.plumbing.failures import TransientError

if TYPE_CHECKING:  # the child process runs this module too: it imports no torch
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

# Figures handed over and not yet written, at most: with more, the loop first waits for the oldest.
# So however far apart the checkpoints are, replies never pile up in the pipe unread.
MAX_PENDING = 2


class FigureWorker:
    """Logs figures under one tag of `writer`, drawn by a child process."""

    def __init__(self, writer: SummaryWriter, tag: str, classes: Sequence[str]) -> None:
        self.writer, self.tag = writer, tag
        self.process = start_child(__name__, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.pending: deque[tuple[int, float]] = deque()  # (step, wall time) of the figures being drawn, oldest first
        self._send(list(classes))

    def log(self, step: int, images: np.ndarray, probabilities: np.ndarray, labels: np.ndarray) -> None:
        """Hand over uint8 images (N, 28, 28), their (N, C) probabilities and (N,) labels; returns at once."""
        # Figures drawn by now go to the writer now, so TensorBoard shows each one a log point later at most.
        while self.pending and (len(self.pending) >= MAX_PENDING or self._reply_waiting()):
            self._write_oldest()
        self._send((images, probabilities, labels))
        self.pending.append((step, time.time()))

    def flush(self) -> None:
        """Wait until every figure handed over is in the writer."""
        while self.pending:
            self._write_oldest()

    def close(self) -> None:
        """Stop the child process; figures not yet flushed are dropped."""
        if self.pending:  # after an error: nobody will read its replies, which it may be blocked on
            self.process.terminate()
        with contextlib.suppress(BrokenPipeError):  # it has already gone
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _send(self, message: Any) -> None:
        try:
            pickle.dump(message, self.process.stdin)
            self.process.stdin.flush()
        except BrokenPipeError:
            raise self._died() from None

    def _reply_waiting(self) -> bool:
        return bool(select.select([self.process.stdout], [], [], 0)[0])

    def _write_oldest(self) -> None:
        try:
            png, height, width = pickle.load(self.process.stdout)
        except (EOFError, pickle.UnpicklingError):  # it has gone, maybe halfway through a reply
            raise self._died() from None
        from tensorboard.compat.proto.summary_pb2 import Summary

        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png)
        summary = Summary(value=[Summary.Value(tag=self.tag, image=image)])
        step, wall_time = self.pending.popleft()
        self.writer.file_writer.add_summary(summary, step, wall_time)  # as add_image writes it

    def _died(self) -> TransientError:
        return TransientError(f"the figure process exited with status {self.process.wait()}; see its output above")


def _serve(requests: IO[bytes], replies: IO[bytes]) -> None:
    """In the child: draw each request, reply with (png, height, width), until the input ends."""
    from fashion_pipeline.tasks.ml.figures import PredictionsFigure, png_bytes

    figure = PredictionsFigure(pickle.load(requests))
    while True:
        try:
            images, probabilities, labels = pickle.load(requests)
        except EOFError:
            return
        rgb = figure.render(images, probabilities, labels)  # (H, W, 3)
        pickle.dump((png_bytes(rgb), *rgb.shape[:2]), replies)
        replies.flush()


if __name__ == "__main__":
    child_arguments()
    # Replies get a descriptor of their own; anything printed goes to stderr, not into the pickles.
    reply_stream = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    _serve(sys.stdin.buffer, reply_stream)
