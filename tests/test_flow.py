"""The whole flow on tiny synthetic data: every TensorBoard tab the tutorial shows, and metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fashion_pipeline.tasks.ml.dataset import CLASSES
from tests.helpers import TINY, VALIDATION, expected_loss_steps, run_tiny_flow, total_steps
from tests.synthetic import TRAIN_SIZE
from tests.tensorboard_reader import image_steps, load_runs, scalar_steps, training_run


def test_flow_returns_and_writes_metrics(finished_run: tuple[Path, dict]) -> None:
    run_dir, result = finished_run
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written["test_accuracy"] == result["test_accuracy"]
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert set(written["per_class_ap"]) == set(CLASSES)
    assert all(0.0 <= ap <= 1.0 for ap in written["per_class_ap"].values())
    # The synthetic classes are easy: a working pipeline learns them well past chance (0.1).
    assert result["test_accuracy"] > 0.6


def test_images_graph_and_projector_in_run(finished_run: tuple[Path, dict]) -> None:
    run_dir, _ = finished_run
    runs = load_runs(run_dir)
    assert image_steps(runs, ".", "four_fashion_mnist_images") == [0]
    assert runs.Runs()["."]["graph"] is True
    config = (run_dir / "projector_config.pbtxt").read_text()
    assert 'metadata_path: "00000/default/metadata.tsv"' in config and "sprite" in config
    labels = (run_dir / "00000" / "default" / "metadata.tsv").read_text().split("\n")
    assert len([label for label in labels if label]) == 100 and set(labels) - {""} <= set(CLASSES)
    assert (run_dir / "00000" / "default" / "sprite.png").stat().st_size > 1000


def test_training_curves_figures_and_pr_curves(finished_run: tuple[Path, dict]) -> None:
    run_dir, _ = finished_run
    runs = load_runs(run_dir)
    train = training_run(runs)
    expected = expected_loss_steps()
    assert scalar_steps(runs, train, "training loss") == expected
    assert image_steps(runs, train, "predictions vs. actuals") == expected
    pr_curves = runs.PluginRunToTagToContent("pr_curves")[train]
    assert sorted(pr_curves) == sorted(CLASSES)
    assert image_steps(runs, train, "confusion matrix") == [total_steps()]


def test_outputs_are_pictures_people_can_open(finished_run: tuple[Path, dict]) -> None:
    run_dir, result = finished_run
    for picture in (run_dir / "summary.png", Path(result["train_dir"]) / "confusion_matrix.png"):
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prefect_artifacts_summarise_the_run(finished_run: tuple[Path, dict]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, ArtifactFilterType

    _, result = finished_run
    with get_client(sync_client=True) as client:
        def artifacts(**filter_fields: object) -> list:
            return client.read_artifacts(artifact_filter=ArtifactFilter(**filter_fields))

        # Other tests run experiments called "tiny" too: find this run's among each key's versions.
        summaries = artifacts(key=ArtifactFilterKey(any_=["tiny-summary"]))
        tables = artifacts(key=ArtifactFilterKey(any_=["tiny-per-class"]))
        progress = artifacts(type=ArtifactFilterType(any_=["progress"]))
    [summary] = [artifact for artifact in summaries if result["train_dir"] in artifact.data][:1]
    assert f"{result['test_accuracy']:.4f}" in summary.data and "tensorboard --logdir" in summary.data
    assert "| train |" in summary.data  # which stages ran and which came from cache
    rows = json.loads(tables[0].data)
    assert [row["class"] for row in rows] == list(CLASSES) and {"precision", "recall", "ap"} <= set(rows[0])
    assert any(artifact.data == 100.0 for artifact in progress)  # training's progress reached the end


def test_validation_at_each_epochs_end(prefect_api_url: str, synthetic_mirror: Path, tmp_path: Path) -> None:
    result = run_tiny_flow(tmp_path, synthetic_mirror, experiment="validated", validation_size=VALIDATION)
    epoch = total_steps(TINY | {"epochs": 1}, TRAIN_SIZE - VALIDATION)
    runs = load_runs(Path(result["train_dir"]))
    for tag in ("validation loss", "validation accuracy"):
        assert scalar_steps(runs, ".", tag) == [epoch, 2 * epoch], tag  # beside the training loss, in its run
    assert 0 <= result["validation_accuracy"] <= 1 and result["validation_loss"] > 0
    metrics = json.loads((tmp_path / "runs" / "validated" / "metrics.json").read_text())
    assert metrics["validation_accuracy"] == result["validation_accuracy"]
    assert (Path(result["train_dir"]) / "summary.png").stat().st_size > 10_000


def test_test_time_flip_in_validation_and_evaluation(prefect_api_url: str, synthetic_mirror: Path,
                                                     tmp_path: Path) -> None:
    import torch

    from fashion_pipeline.tasks.ml import batches
    from fashion_pipeline.tasks.ml.dataset import load_split
    from fashion_pipeline.tasks.ml.evaluation import score
    from fashion_pipeline.tasks.ml.model import MODEL_ARGS, build_model, log_probabilities

    settings = {"augment": True, "augment_shift": 0, "weight_decay": 1e-3, "validation_size": VALIDATION}
    flipped = run_tiny_flow(tmp_path, synthetic_mirror, experiment="flipped", test_time_flip=True, **settings)
    plain = run_tiny_flow(tmp_path, synthetic_mirror, experiment="plain", **settings)
    assert flipped["train_dir"] != plain["train_dir"]  # the option is part of the training's key
    exported = torch.load(Path(flipped["train_dir"]) / "model.pt", weights_only=True)
    assert exported["hyperparameters"]["test_time_flip"] is True
    assert exported["model"]["fc3.bias"].equal(torch.load(Path(plain["train_dir"]) / "model.pt",
                                                          weights_only=True)["model"]["fc3.bias"])  # same weights
    net = build_model(MODEL_ARGS)
    net.load_state_dict(exported["model"])
    net.eval()
    manifest = tmp_path / "data" / "FashionMNIST" / "dataset.json"
    test_images, test_labels = load_split(manifest, "test")
    train_images, train_labels = load_split(manifest, "train")
    _, held = batches.validation_split(train_labels, VALIDATION, TINY.get("seed", 0))
    with torch.no_grad():
        def predicted(images: torch.Tensor, mirrored: bool) -> torch.Tensor:
            return log_probabilities(net, batches.normalise(images, "cpu"), mirrored)

        for result, mirrored in ((flipped, True), (plain, False)):
            # The test metrics are those of the run's own way of predicting, and so is the validation loss.
            metrics = score(predicted(test_images, mirrored).exp(), test_labels)
            assert result["mean_ap"] == pytest.approx(metrics["mean_ap"], abs=1e-6)
            validation_loss = torch.nn.functional.nll_loss(predicted(train_images[held], mirrored), train_labels[held])
            assert result["validation_loss"] == pytest.approx(validation_loss.item(), rel=1e-5)
    assert flipped["mean_ap"] != pytest.approx(plain["mean_ap"], abs=1e-6)
    assert flipped["validation_loss"] != pytest.approx(plain["validation_loss"], rel=1e-5)


def test_without_log_every_a_large_batch_still_draws_a_loss_curve(prefect_api_url: str, synthetic_mirror: Path,
                                                                   tmp_path: Path) -> None:
    settings = {"batch_size": 32, "epochs": 1, "log_every": None}
    run_tiny_flow(tmp_path, synthetic_mirror, experiment="default-log", **settings)
    runs = load_runs(tmp_path / "runs" / "default-log")
    every = max(1, (TRAIN_SIZE // 32) // 10)  # an epoch's steps / 10: 1000 would log nothing
    assert scalar_steps(runs, training_run(runs), "training loss") == list(range(every, TRAIN_SIZE // 32 + 1, every))
