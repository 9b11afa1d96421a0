"""Reruns redo only what changed: Prefect cache states, stale artifacts, --refresh, the experiment lock."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fashion_pipeline.tasks.plumbing.failures import RunFailed
from fashion_pipeline.tasks.plumbing.lock import ExperimentBusyError
from tests.helpers import TINY, final_weights, run_tiny_flow, same_weights

UPSTREAM = ("download", "inspect", "graph")
DOWNSTREAM_OF_TRAINING = ("train", "checkpoint", "evaluate")


@pytest.fixture
def first_run(prefect_api_url: str, synthetic_mirror: Path, tmp_path: Path) -> tuple[Path, dict, float]:
    started = time.perf_counter()
    result = run_tiny_flow(tmp_path, synthetic_mirror)
    return tmp_path, result, time.perf_counter() - started


def test_identical_rerun_computes_nothing(first_run: tuple[Path, dict, float], synthetic_mirror: Path) -> None:
    root, first, first_seconds = first_run
    assert set(first["stages"].values()) == {"Completed"}
    started = time.perf_counter()
    again = run_tiny_flow(root, synthetic_mirror)
    ratio = (time.perf_counter() - started) / first_seconds
    print(f"cached rerun took {ratio:.2f}x the first run's time")
    assert set(again["stages"].values()) == {"Cached"}
    assert again["test_accuracy"] == first["test_accuracy"]


def test_new_learning_rate_reruns_training_and_downstream_only(first_run: tuple[Path, dict, float], synthetic_mirror: Path) -> None:
    root, first, _ = first_run
    changed = run_tiny_flow(root, synthetic_mirror, lr=0.01)
    assert {stage: changed["stages"][stage] for stage in UPSTREAM} == dict.fromkeys(UPSTREAM, "Cached")
    assert {stage: changed["stages"][stage] for stage in DOWNSTREAM_OF_TRAINING} == dict.fromkeys(DOWNSTREAM_OF_TRAINING, "Completed")
    # Its own training folder, so TensorBoard never mixes the two curves; the first one is kept.
    assert changed["train_dir"] != first["train_dir"]
    assert (Path(first["train_dir"]) / "model.pt").is_file()


def test_settings_that_cannot_change_weights_do_not_retrain(first_run: tuple[Path, dict, float], synthetic_mirror: Path) -> None:
    root, first, _ = first_run
    again = run_tiny_flow(root, synthetic_mirror, checkpoint_every=7, log_every=20)
    assert again["stages"]["train"] == "Cached"
    assert again["train_dir"] == first["train_dir"]


def test_new_seed_reruns_inspection_and_training(first_run: tuple[Path, dict, float], synthetic_mirror: Path) -> None:
    root, _, _ = first_run
    changed = run_tiny_flow(root, synthetic_mirror, seed=1)
    assert changed["stages"]["download"] == changed["stages"]["graph"] == "Cached"
    assert changed["stages"]["inspect"] == changed["stages"]["train"] == "Completed"


def test_deleted_model_file_is_exported_again(first_run: tuple[Path, dict, float], synthetic_mirror: Path) -> None:
    root, first, _ = first_run
    (Path(first["train_dir"]) / "model.pt").unlink()
    again = run_tiny_flow(root, synthetic_mirror)
    assert again["stages"]["train"] == "Cached"
    assert again["stages"]["checkpoint"] == "Completed"
    assert same_weights(final_weights(again), final_weights(first))


def test_deleted_training_retrains_to_the_same_weights(first_run: tuple[Path, dict, float], synthetic_mirror: Path) -> None:
    root, first, _ = first_run
    weights = final_weights(first)
    for path in (Path(first["train_dir"]) / "checkpoints").iterdir():
        path.unlink()
    again = run_tiny_flow(root, synthetic_mirror)
    assert again["stages"]["train"] == "Completed"
    assert same_weights(final_weights(again), weights)


def test_corrupted_dataset_cache_is_rebuilt(first_run: tuple[Path, dict, float], synthetic_mirror: Path) -> None:
    root, first, _ = first_run
    cache = next((root / "data" / "FashionMNIST").glob("fashion-mnist-*.pt"))
    cache.write_bytes(cache.read_bytes()[:1000])
    again = run_tiny_flow(root, synthetic_mirror)
    assert again["stages"]["download"] == "Completed"
    assert again["stages"]["train"] == "Cached"  # the same data again: nothing downstream changes
    assert again["test_accuracy"] == first["test_accuracy"]


def test_refresh_named_stage(first_run: tuple[Path, dict, float], synthetic_mirror: Path) -> None:
    root, first, _ = first_run
    again = run_tiny_flow(root, synthetic_mirror, refresh=["evaluate"])
    assert again["stages"]["evaluate"] == "Completed"
    assert again["stages"]["train"] == "Cached"
    everything = run_tiny_flow(root, synthetic_mirror, refresh=["all"])
    assert set(everything["stages"].values()) == {"Completed"}
    assert same_weights(final_weights(everything), final_weights(first))


def test_second_run_on_a_busy_experiment_is_refused(first_run: tuple[Path, dict, float], synthetic_mirror: Path) -> None:
    root, _, _ = first_run
    metrics_before = (root / "runs" / "tiny" / "metrics.json").read_text()
    holder = subprocess.Popen(  # another process running this experiment
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from fashion_pipeline.tasks.plumbing.lock import experiment_lock\n"
         "with experiment_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(120)",
         str(root / "runs" / "tiny")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFailed, match=f"in use by another run \\(pid {holder.pid}\\)") as failed:
            run_tiny_flow(root, synthetic_mirror, lr=0.03)
        assert isinstance(failed.value.__cause__, ExperimentBusyError)
    finally:
        holder.kill()
        holder.wait()
    assert (root / "runs" / "tiny" / "metrics.json").read_text() == metrics_before
    assert json.loads(metrics_before)["parameters"]["lr"] == TINY["lr"]
