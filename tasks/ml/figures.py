"""Matplotlib figures of the run, drawn from numpy arrays without pyplot (no display, no global state).

Each figure is drawn by an Agg canvas of its own, so no backend is chosen for the process.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image


class PredictionsFigure:
    """The tutorial's "predictions vs. actuals": one subplot per image, titled with the predicted class,
    its probability and the true class, green when right and red when wrong.

    Built and laid out once, then redrawn with new data at each log point: a third of the cost of a
    new figure.
    """

    def __init__(self, classes: Sequence[str], count: int = 4) -> None:
        self.classes = classes
        self.figure = Figure(figsize=(3 * count, 3.3), layout="constrained")
        self.axes = [self.figure.add_subplot(1, count, index + 1, xticks=[], yticks=[]) for index in range(count)]
        blank = np.zeros((28, 28), dtype=np.uint8)
        # Upscaled about tenfold, so "nearest" is what the default interpolation would pick, minus its checks.
        self.images = [axes.imshow(blank, cmap="Greys", vmin=0, vmax=255, interpolation="nearest")
                       for axes in self.axes]
        self.canvas = FigureCanvasAgg(self.figure)
        # Every title has two lines of the same font, so one layout fits them all: lay out once around
        # sample titles, then keep it (each constrained-layout pass would cost a third of a redraw).
        for axes in self.axes:
            axes.set_title("Shirt, 100.0%\n(label: Ankle boot)")
        self.figure.get_layout_engine().set(h_pad=0.1)  # inches: room above the titles' first line
        self.canvas.draw()
        self.figure.set_layout_engine("none")

    def render(self, images: np.ndarray, probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Draw uint8 images (N, 28, 28) with their (N, C) probabilities and (N,) labels; returns RGB (H, W, 3).

        N may be below the figure's count (a last, smaller batch): the spare subplots stay empty.
        """
        confidence, predicted = probabilities.max(axis=1), probabilities.argmax(axis=1)  # (N,), (N,)
        for index, (axes, artist) in enumerate(zip(self.axes, self.images)):
            shown = index < len(images)
            artist.set_visible(shown)
            axes.set_title("")
            if shown:
                artist.set_data(images[index])
                axes.set_title(
                    f"{self.classes[predicted[index]]}, {100 * confidence[index]:.1f}%\n(label: {self.classes[labels[index]]})",
                    color="green" if predicted[index] == labels[index] else "red",
                )
        self.canvas.draw()
        return np.asarray(self.canvas.buffer_rgba())[..., :3].copy()


def confusion_figure(matrix: np.ndarray, classes: Sequence[str]) -> Figure:
    """Counts of true class (rows) against predicted class (columns), each cell annotated."""
    figure = Figure(figsize=(8, 7), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, shrink=0.8)
    axes.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true",
             title="Confusion matrix (test set)")
    axes.set_xticklabels(classes, rotation=45, ha="right")
    axes.set_yticklabels(classes)
    threshold = matrix.max() / 2
    for row in range(len(classes)):
        for column in range(len(classes)):
            count = int(matrix[row, column])
            axes.text(column, row, count, ha="center", va="center", fontsize=7,
                      color="white" if count > threshold else "black")
    return figure


def per_class_accuracy_figure(accuracy: dict[str, float]) -> Figure:
    """A horizontal bar per class: the share of its test images classified correctly."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    names = list(accuracy)
    axes.barh(names, [accuracy[name] for name in names], color="tab:blue")
    axes.invert_yaxis()
    axes.set(xlim=(0, 1), xlabel="accuracy", title="Per-class accuracy (test set)")
    for row, name in enumerate(names):
        axes.text(min(accuracy[name] + 0.01, 0.9), row, f"{accuracy[name]:.3f}", va="center", fontsize=8)
    return figure


def summary_figure(
    loss: list[tuple[int, float]],
    pr_curves: dict[str, tuple[np.ndarray, np.ndarray]],
    confusion: np.ndarray,
    title: str,
    validation_loss: list[tuple[int, float]] = (),
    validation_accuracy: list[tuple[int, float]] = (),
) -> Figure:
    """One page for someone who opens no TensorBoard: loss curves, PR curves and confusion matrix.

    Args:
        loss: (step, training loss) points.
        pr_curves: class name -> (precision, recall) arrays.
        confusion: (C, C) counts, true class by row.
        title: the page's title (experiment and accuracy).
        validation_loss, validation_accuracy: (step, value) points at each epoch's end, if validated.
    """
    figure = Figure(figsize=(18, 5.5), layout="constrained")
    figure.suptitle(title)
    loss_axes, pr_axes, confusion_axes = figure.subplots(1, 3)
    for points, label, style in ((loss, "training", {"marker": "o", "markersize": 3}),
                                 (validation_loss, "validation", {"marker": "s", "color": "tab:orange"})):
        if points:
            steps, values = zip(*points)
            loss_axes.plot(steps, values, label=label, **style)
    handles, labels = loss_axes.get_legend_handles_labels()
    if validation_accuracy:
        steps, values = zip(*validation_accuracy)
        accuracy_axes = loss_axes.twinx()
        handles += accuracy_axes.plot(steps, values, marker="^", color="tab:green", label="validation accuracy")
        labels.append("validation accuracy")
        accuracy_axes.set(ylabel="validation accuracy", ylim=(0, 1))
    if validation_loss or validation_accuracy:  # one legend for both axes: every marker drawn is in it
        loss_axes.legend(handles, labels, fontsize=8, loc="upper right")
    loss_axes.set(title="loss" if validation_loss else "training loss", xlabel="step", ylabel="mean cross-entropy")
    loss_axes.grid(alpha=0.3)
    for name, (precision, recall) in pr_curves.items():
        pr_axes.plot(recall, precision, label=name, linewidth=1.2)
    pr_axes.set(title="precision-recall (test set)", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    pr_axes.legend(fontsize=7, loc="lower left")
    pr_axes.grid(alpha=0.3)
    confusion_axes.imshow(confusion, cmap="Blues")
    names = list(pr_curves)
    confusion_axes.set(title="confusion matrix", xlabel="predicted", ylabel="true",
                       xticks=range(len(names)), yticks=range(len(names)))
    confusion_axes.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    confusion_axes.set_yticklabels(names, fontsize=7)
    return figure


def pixels(figure: Figure) -> np.ndarray:
    """The figure drawn once by Agg: RGB (H, W, 3) uint8, for TensorBoard and for a PNG file alike."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def png_bytes(rgb: np.ndarray) -> bytes:
    """RGB (H, W, 3) uint8 pixels encoded as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()
