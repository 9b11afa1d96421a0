"""The report stage: the run's result where people look: metrics.json, TensorBoard HPARAMS and TEXT, Prefect artifacts."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from fashion_pipeline.tasks.config import RunConfig
from fashion_pipeline.tasks.ml.dataset import CLASSES
from fashion_pipeline.tasks.ml.hyperparameters import Hyperparameters
from fashion_pipeline.tasks.plumbing import storage
from fashion_pipeline.tasks.plumbing.log import stage_logger
from fashion_pipeline.tasks.plumbing.files import atomic_write, atomic_write_json, digest_json, write_manifest
from fashion_pipeline.tasks.plumbing.tensorboard_files import event_files, replacing_writer

HPARAM_FIELDS = tuple(field.name for field in fields(Hyperparameters))  # what decides the weights
HPARAM_METRICS = ("test_accuracy", "mean_ap", "validation_accuracy", "validation_loss")  # those a run has


def report(config: RunConfig, device: str, evaluation: Path | str, stages: dict[str, str]) -> dict[str, Any]:
    """Publish the run's result and return it.

    Args:
        config: the run's parameters.
        device: the device that trained.
        evaluation: the evaluation manifest (a path, or a URL in a store); its folder is the training's folder.
        stages: each stage's final Prefect state name ("Completed", "Cached").

    Returns:
        `<run>/metrics.json`'s content: the evaluation's metrics, the validation's (where the training
        held images out), and where the outputs are.
    """
    train_dir = storage.fetched_manifest(evaluation).parent
    run_dir = storage.local_path(config.run_dir)
    metrics = json.loads((train_dir / "metrics.json").read_text())
    training = storage.fetched_manifest(train_dir / "training.json")
    metrics |= json.loads(training.read_text()).get("validation") or {}
    result = {**metrics, "run_dir": config.run_dir, "train_dir": storage.location_of(train_dir), "device": device,
              "parameters": config.model_dump(), "stages": stages}
    summary = (train_dir / "summary.png").read_bytes()
    storage.publish_files([atomic_write(run_dir / "summary.png", lambda stream: stream.write(summary)),
                           atomic_write_json(run_dir / "metrics.json", result)])
    log_to_tensorboard(train_dir, config, device, metrics)
    if TaskRunContext.get() is not None:
        try:
            publish_artifacts(config, result)
        except Exception as error:  # noqa: BLE001  (artifacts are for people to read: never a failed run)
            stage_logger().warning("The run's summary artifacts were not published: %s", " ".join(str(error).split()))
    return result


def log_to_tensorboard(train_dir: Path, config: RunConfig, device: str, metrics: dict[str, Any]) -> None:
    """HPARAMS in the training's own run (not add_hparams' timestamped subfolder) and the whole config as TEXT.

    Written again only when something they show has changed: a cached rerun imports no torch for them.
    """
    values = {name: getattr(config, name) for name in HPARAM_FIELDS} | {"device": device}
    results = {f"hparam/{name}": metrics[name] for name in HPARAM_METRICS if name in metrics}
    text = "```json\n" + json.dumps(config.model_dump(), indent=2) + "\n```"
    manifest_path = train_dir / "report.json"
    facts = {"inputs": digest_json([values, results, text, metrics["global_step"]])}
    if storage.read_verified(manifest_path, **facts):
        return
    from torch.utils.tensorboard.summary import hparams

    with replacing_writer(train_dir, "report") as writer:
        for summary in hparams(values, results):  # experiment, session start, session end
            writer.file_writer.add_summary(summary)
        for tag, value in results.items():
            writer.add_scalar(tag, value, metrics["global_step"])
        writer.add_text("config", text, metrics["global_step"])
    events = event_files(train_dir, "report")
    storage.publish(write_manifest(manifest_path, events, **facts), events)


def artifact_key(name: str) -> str:
    """`name` as a Prefect artifact key, which allows lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")


def publish_artifacts(config: RunConfig, result: dict[str, Any]) -> None:
    """A markdown summary and a per-class table, keyed by experiment so the UI keeps their history."""
    key = artifact_key(config.experiment)
    rows = [{"class": name, "precision": round(result["per_class_precision"][name], 4),
             "recall": round(result["per_class_recall"][name], 4), "ap": round(result["per_class_ap"][name], 4)}
            for name in CLASSES]
    create_table_artifact(rows, key=f"{key}-per-class", description="Per-class precision, recall and AP on the test set")
    create_markdown_artifact(summary_markdown(result), key=f"{key}-summary", description="Fashion-MNIST run summary")


def summary_markdown(result: dict[str, Any]) -> str:
    """The run's summary as markdown: metrics, parameters, where the outputs are, what came from cache."""
    lines = [
        f"# {result['parameters']['experiment']}",
        f"**Test accuracy: {result['test_accuracy']:.4f}**, mean AP {result['mean_ap']:.4f}, on {result['device']}",
        "",
        "| class | AP |", "|---|---|",
        *(f"| {name} | {result['per_class_ap'][name]:.4f} |" for name in CLASSES),
        "",
        "| parameter | value |", "|---|---|",
        *(f"| {name} | {value} |" for name, value in result["parameters"].items()),
        "",
        "| stage | state |", "|---|---|",
        *(f"| {stage} | {state} |" for stage, state in result["stages"].items()),
        "",
        f"Run directory: `{result['run_dir']}`; this training: `{result['train_dir']}`",
        "",
        f"Open it: `tensorboard --logdir {result['run_dir']}`",
    ]
    return "\n".join(lines)


report_task = task(report, name="report", cache_policy=NO_CACHE, persist_result=False)
