"""Evaluation on the test set: class probabilities, metrics, PR curves and the figures, in TensorBoard and as PNGs."""

from __future__ import annotations

from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fashion_pipeline.tasks.ml import batches, model
from fashion_pipeline.tasks.ml.dataset import CLASSES
from fashion_pipeline.tasks.ml.devices import cpu_threads
from fashion_pipeline.tasks.ml.figures import (
    confusion_figure, per_class_accuracy_figure, pixels, png_bytes, summary_figure,
)
from fashion_pipeline.tasks.ml.training_loop import LOSS_TAG, VALIDATION_ACCURACY_TAG, VALIDATION_LOSS_TAG
from fashion_pipeline.tasks.plumbing.files import atomic_write
from fashion_pipeline.tasks.plumbing.progress import StepProgress
from fashion_pipeline.tasks.plumbing.tensorboard_files import read_scalars, replacing_writer

CONFUSION_TAG, CLASS_ACCURACY_TAG = "confusion matrix", "per-class accuracy"


def publish_pictures(out: Path, metrics: dict[str, Any], probabilities: torch.Tensor, labels: torch.Tensor) -> list[Path]:
    """Log the PR curves and figures to TensorBoard; save the confusion matrix, per-class accuracy and summary as PNGs.

    Args:
        out: the training's folder (its TensorBoard run).
        metrics: what `score` returned, with the training's `global_step`.
        probabilities: (N, C) test-set class probabilities.
        labels: (N,) true classes.

    Returns:
        The PNG files written.
    """
    step = metrics["global_step"]
    confusion = np.array(metrics["confusion_matrix"])
    by_tag = {CONFUSION_TAG: confusion_figure(confusion, CLASSES),
              CLASS_ACCURACY_TAG: per_class_accuracy_figure(metrics["per_class_accuracy"])}
    curves = {name: tuple(curve.numpy() for curve in precision_recall(probabilities[:, index], labels == index))
              for index, name in enumerate(CLASSES)}
    summary = summary_figure(read_scalars(out, LOSS_TAG), curves, confusion,
                             f"{out.parent.name}/{out.name}: test accuracy {metrics['test_accuracy']:.4f}",
                             validation_loss=read_scalars(out, VALIDATION_LOSS_TAG),
                             validation_accuracy=read_scalars(out, VALIDATION_ACCURACY_TAG))
    drawn = {tag: pixels(figure) for tag, figure in by_tag.items()}  # each (H, W, 3), drawn once
    pictures = [save_png(rgb, out / f"{tag.replace(' ', '_')}.png") for tag, rgb in drawn.items()]
    pictures.append(save_png(pixels(summary), out / "summary.png"))
    with replacing_writer(out, "evaluate") as writer:
        for index, name in enumerate(CLASSES):
            writer.add_pr_curve(name, labels == index, probabilities[:, index], global_step=step)
        for tag, rgb in drawn.items():
            writer.add_image(tag, rgb, global_step=step, dataformats="HWC")
    return pictures


def predict(exported: dict[str, Any], images: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities (N, C) of the exported model on uint8 images (N, 28, 28), on the CPU, predicted as
    its hyperparameters say (with or without the test-time flip; a model.pt older than that option: without)."""
    net = model.build_model(exported["model_args"])
    net.load_state_dict(exported["model"])
    mirrored = bool(exported["hyperparameters"].get("test_time_flip", False))
    torch.set_num_threads(cpu_threads(batches.INFERENCE_BATCH))
    total = batches.batch_count(len(images), batches.INFERENCE_BATCH)
    with closing(StepProgress("evaluate", total=total)) as progress:
        return model.predicted_log_probabilities(net, images, "cpu", mirrored, each=progress.advance).exp()


def score(probabilities: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Test accuracy; per class AP, precision and recall (per-class accuracy is the recall, under the name
    people look for); the confusion matrix (true class by row)."""
    predicted = probabilities.argmax(dim=1)
    classes = probabilities.shape[1]
    confusion = torch.bincount(labels * classes + predicted, minlength=classes * classes).reshape(classes, classes)
    true_positives = confusion.diag().float()
    recall = true_positives / confusion.sum(dim=1).clamp(min=1)
    precision = true_positives / confusion.sum(dim=0).clamp(min=1)
    ap = {name: average_precision(probabilities[:, index], labels == index) for index, name in enumerate(CLASSES)}
    return {
        "test_accuracy": (predicted == labels).float().mean().item(),
        "per_class_ap": ap,
        "mean_ap": sum(ap.values()) / len(ap),
        "per_class_accuracy": dict(zip(CLASSES, recall.tolist())),  # of a class's images, the share predicted right
        "per_class_precision": dict(zip(CLASSES, precision.tolist())),
        "per_class_recall": dict(zip(CLASSES, recall.tolist())),
        "confusion_matrix": confusion.tolist(),
    }


def precision_recall(scores: torch.Tensor, positives: torch.Tensor, points: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Precision and recall at `points` thresholds along the ranking by score (for plotting)."""
    hits = positives[scores.argsort(descending=True)].float()  # (N,)
    ranks = torch.linspace(1, len(hits), points).long()  # (points,) cut-offs: the top-k predictions
    found = hits.cumsum(0)[ranks - 1]
    return found / ranks, found / hits.sum().clamp(min=1)


def save_png(rgb: np.ndarray, path: Path) -> Path:
    """Write RGB (H, W, 3) pixels to a PNG file, atomically."""
    return atomic_write(path, lambda stream: stream.write(png_bytes(rgb)))


def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the precision-recall curve as a step function, as scikit-learn's average_precision_score:
    the sum over thresholds of precision times the recall gained there.

    Equal scores are one threshold: float32 softmax saturates to exactly 1.0, so ties are common.
    """
    order = scores.argsort(descending=True, stable=True)
    ranked, hits = scores[order], positives[order].float()  # (N,), (N,) 1 where the k-th highest is a positive
    last_of_tie = torch.ones_like(ranked, dtype=torch.bool)
    last_of_tie[:-1] = ranked[1:] != ranked[:-1]  # the end of each group of equal scores: a threshold
    found = hits.cumsum(0)[last_of_tie]  # true positives above each threshold
    precision = found / (torch.arange(1, len(hits) + 1)[last_of_tie])
    recall_gain = torch.diff(found, prepend=found.new_zeros(1)) / hits.sum().clamp(min=1)
    return float((precision * recall_gain).sum())
