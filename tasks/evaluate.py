"""Evaluation stage: the exported model scored on the test set (tasks/evaluation.py), and metrics.json."""

from __future__ import annotations

from pathlib import Path

from tasks.caching import StageOutput, source_digest, stage_task
from tasks.checkpoint import load_model_file
from tasks.data import fingerprint, load_split
from tasks.events import event_files
from tasks.faults import fault_point
from tasks.files import atomic_write_json, digest_json, read_manifest, sha256_file, write_manifest


def evaluation_output(model_file: Path, dataset: Path, **_: object) -> StageOutput:
    """The evaluation manifest beside the model, and the digest of the model, data and code it must match."""
    inputs = digest_json([sha256_file(Path(model_file)), fingerprint(dataset), EVALUATION_CODE])
    return Path(model_file).parent / "evaluation.json", {"inputs": inputs}


def evaluate(model_file: Path, dataset: Path, refresh: bool = False) -> Path:
    """Score the exported model on the test set and log one PR curve per class.

    Args:
        model_file: the manifest of the exported `model.pt`; the model is rebuilt from that file alone.
        dataset: the dataset manifest.
        refresh: evaluate again even if this model was already evaluated.

    Returns:
        The evaluation manifest; its folder holds `metrics.json`:
        `{"test_accuracy", "per_class_ap", "per_class_accuracy", "per_class_precision",
        "per_class_recall", "mean_ap", "confusion_matrix", "global_step"}`.
    """
    manifest_path, facts = evaluation_output(model_file, dataset)
    if not refresh and read_manifest(manifest_path, **facts):
        return manifest_path
    fault_point("evaluate")
    from tasks.evaluation import predict, publish_pictures, score  # torch: only when there is work to do

    exported = load_model_file(model_file)
    images, labels = load_split(dataset, "test")
    probabilities = predict(exported, images)  # (N, C)
    metrics = score(probabilities, labels)
    metrics["global_step"] = exported["global_step"]

    out = manifest_path.parent
    pictures = publish_pictures(out, metrics, probabilities, labels)
    metrics_path = atomic_write_json(out / "metrics.json", metrics)
    return write_manifest(manifest_path, [metrics_path, *pictures, *event_files(out, "evaluate")], **facts)


# The code that decides the metrics and the pictures.
EVALUATION_CODE = source_digest("tasks.model", "tasks.batches", "tasks.figures", "tasks.evaluation", __name__)
evaluate_task = stage_task(evaluate, name="evaluate", output=evaluation_output, code=EVALUATION_CODE)
