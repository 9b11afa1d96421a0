"""Training figures rendered in a separate process, so that training never waits for matplotlib."""

from __future__ import annotations

import multiprocessing
import struct
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any

from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter


class InlineExecutor(Executor):
    """Runs each call at once: for processes that may not start children (daemonic Dask workers)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


class BackgroundFigures:
    """Renders PNG figures in one worker process and writes them to TensorBoard in submission order.

    Training tiny batches keeps one core busy; the renderer uses another, so a figure costs the loop
    only handing over a few small arrays instead of ~100 ms of matplotlib.
    """

    def __init__(self, writer: SummaryWriter) -> None:
        self.writer = writer
        if multiprocessing.current_process().daemon:
            self.executor: Executor = InlineExecutor()
        else:
            # forkserver: a fresh, light process (no torch, no Prefect threads copied by fork).
            self.executor = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("forkserver"))
        self.pending: deque[tuple[str, int, Future]] = deque()

    def submit(self, tag: str, step: int, render: Callable[..., bytes], *args: Any) -> None:
        """Queue `render(*args)` (it returns PNG bytes) for `tag` at `step`; write whatever is ready."""
        self.pending.append((tag, step, self.executor.submit(render, *args)))
        self.write_ready()

    def write_ready(self, wait: bool = False) -> None:
        """Write the finished figures, in order; with `wait`, all of them."""
        while self.pending and (wait or self.pending[0][2].done()):
            tag, step, future = self.pending.popleft()
            self.writer.file_writer.add_summary(image_summary(tag, future.result()), step)

    def close(self) -> None:
        self.write_ready(wait=True)
        self.executor.shutdown()


def image_summary(tag: str, png: bytes) -> Summary:
    """An image summary holding already-encoded PNG bytes (what add_figure writes, minus the re-encoding)."""
    width, height = struct.unpack(">II", png[16:24])  # from the PNG's IHDR chunk
    image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)  # 4: RGBA
    return Summary(value=[Summary.Value(tag=tag, image=image)])
