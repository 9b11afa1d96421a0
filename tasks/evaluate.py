"""The evaluate stage: the exported model scored on the test set (tasks/ml/evaluation.py), and metrics.json."""

from __future__ import annotations

from pathlib import Path

from fashion_pipeline.tasks.ml.checkpoints import load_model_file
from fashion_pipeline.tasks.ml.dataset import fingerprint, load_split
from fashion_pipeline.tasks.plumbing.faults import fault_point
from fashion_pipeline.tasks.plumbing.files import atomic_write_json, digest_json, sha256_file
from fashion_pipeline.tasks.plumbing.tensorboard_files import event_files
from fashion_pipeline.tasks.stage import StageOutput, Written, stage


def evaluation_output(model_file: Path, dataset: Path, **_: object) -> StageOutput:
    """The evaluation manifest beside the model, and the digest of the model and data it must match."""
    return Path(model_file).parent / "evaluation.json", {"inputs": digest_json([sha256_file(Path(model_file)),
                                                                              fingerprint(dataset)])}


# The code that decides the metrics and the pictures, besides this module.
@stage("evaluate", output=evaluation_output, code=("ml.model", "ml.batches", "ml.figures", "ml.evaluation"))
def evaluate(model_file: Path, dataset: Path) -> Written:
    """Score the exported model on the test set and log one PR curve per class.

    Args:
        model_file: the manifest of the exported `model.pt`; the model is rebuilt from that file alone.
        dataset: the dataset manifest.

    Returns:
        `metrics.json` (`{"test_accuracy", "per_class_ap", "per_class_accuracy", "per_class_precision",
        "per_class_recall", "mean_ap", "confusion_matrix", "global_step"}`), the pictures and the events.
    """
    fault_point("evaluate")
    from fashion_pipeline.tasks.ml.evaluation import predict, publish_pictures, score  # torch: only when there is work

    exported = load_model_file(model_file)
    images, labels = load_split(dataset, "test")
    probabilities = predict(exported, images)  # (N, C)
    metrics = score(probabilities, labels)
    metrics["global_step"] = exported["global_step"]

    out = Path(model_file).parent
    pictures = publish_pictures(out, metrics, probabilities, labels)
    metrics_path = atomic_write_json(out / "metrics.json", metrics)
    return Written([metrics_path, *pictures, *event_files(out, "evaluate")])
