"""Interrupted training resumes exactly: a retried fault, a SIGKILL, a truncated checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fashion_pipeline.tasks.ml.checkpoints import CheckpointStore, checksum_file
from tests.helpers import (
    FLOW_SCRIPT, TINY, VALIDATION, expected_loss_steps, final_weights, run_tiny_flow, same_weights, tiny_args, total_steps,
    wait_while_running,
)
from tests.synthetic import TRAIN_SIZE
from tests.tensorboard_reader import image_steps, load_runs, loss_steps, scalar_steps, training_run


@pytest.fixture
def uninterrupted(prefect_api_url: str, synthetic_mirror: Path, tmp_path: Path) -> dict:
    return run_tiny_flow(tmp_path / "reference", synthetic_mirror)


def test_fault_in_training_is_retried_from_checkpoint(
    finished_run: tuple[Path, dict], synthetic_mirror: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FASHION_FAULT", "train:25")  # between the checkpoints at steps 15 and 30
    result = run_tiny_flow(tmp_path / "faulty", synthetic_mirror)
    assert "Resuming from" in caplog.text and "(step 15)" in caplog.text
    assert same_weights(final_weights(result), final_weights(finished_run[1]))  # the same run, never interrupted
    assert loss_steps(Path(result["train_dir"]).parent) == expected_loss_steps()


def test_truncated_newest_checkpoint_is_passed_over(
    finished_run: tuple[Path, dict], synthetic_mirror: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FASHION_FAULT", "train:50")
    # Truncate the newest checkpoint the moment the fault fires: the retry must fall back to the one before.
    original_save = CheckpointStore.save

    def save_then_truncate_at_45(self: CheckpointStore, state: dict) -> Path:
        path = original_save(self, state)
        if state["global_step"] == 45:
            path.write_bytes(path.read_bytes()[:200])
        return path

    monkeypatch.setattr(CheckpointStore, "save", save_then_truncate_at_45)
    result = run_tiny_flow(tmp_path / "truncated", synthetic_mirror)
    assert "Skipping unusable checkpoint" in caplog.text and "step-00000045.pt" in caplog.text
    assert "(step 40)" in caplog.text  # the epoch-end checkpoint before it
    assert same_weights(final_weights(result), final_weights(finished_run[1]))
    assert loss_steps(Path(result["train_dir"]).parent) == expected_loss_steps()


def test_damaged_newest_checkpoint_is_passed_over_with_a_warning(
    finished_run: tuple[Path, dict], synthetic_mirror: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # One byte flipped, which torch.load would accept: the checksum catches it, and the retry resumes
    # from the checkpoint before it.
    monkeypatch.setenv("FASHION_FAULT", "train:55")  # a point no other test uses: each fires once per process
    original_save = CheckpointStore.save

    def save_then_flip_a_byte_at_45(self: CheckpointStore, state: dict) -> Path:
        path = original_save(self, state)
        if state["global_step"] == 45:
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x01
            path.write_bytes(bytes(data))
        return path

    monkeypatch.setattr(CheckpointStore, "save", save_then_flip_a_byte_at_45)
    result = run_tiny_flow(tmp_path / "damaged", synthetic_mirror)
    [warning] = [record.getMessage() for record in caplog.records if "Skipping unusable checkpoint" in record.getMessage()]
    assert "step-00000045.pt" in warning and "the file is damaged" in warning
    assert "(step 40)" in caplog.text
    assert same_weights(final_weights(result), final_weights(finished_run[1]))
    assert loss_steps(Path(result["train_dir"]).parent) == expected_loss_steps()


@pytest.mark.parametrize("older_format", [False, True], ids=["format 4", "format 3"])
def test_killed_after_the_last_checkpoint_keeps_the_training_metrics(
    finished_run: tuple[Path, dict], synthetic_mirror: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    older_format: bool,
) -> None:
    # Killed between the final checkpoint and the manifest: the rerun resumes at the end and trains
    # nothing, yet reports the training's validation (and last loss), which the checkpoint keeps; one of
    # format 3, which kept neither, has its validation worked out again.
    first = run_tiny_flow(tmp_path, synthetic_mirror, validation_size=VALIDATION)
    manifest = Path(first["train_dir"]) / "training.json"
    recorded = json.loads(manifest.read_text())
    manifest.unlink()
    if older_format:
        final = CheckpointStore(Path(first["train_dir"]) / "checkpoints").paths()[-1]
        state = torch.load(final, weights_only=True)
        torch.save({key: value for key, value in state.items() if key not in ("last_loss", "validation", "threads")}
                   | {"format": 3}, final)
        checksum_file(final).unlink()  # written before checkpoints had checksums
    again = run_tiny_flow(tmp_path, synthetic_mirror, validation_size=VALIDATION)
    assert f"(step {total_steps(TINY, train_size=TRAIN_SIZE - VALIDATION)})" in caplog.text
    rewritten = json.loads(manifest.read_text())
    assert rewritten["validation"] == recorded["validation"] and rewritten["validation"] is not None
    assert again["validation_accuracy"] == first["validation_accuracy"]
    assert rewritten["training_loss"] == (None if older_format else recorded["training_loss"])


def test_checkpoint_store_rejects_foreign_and_broken_files(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    torch.save({"not": "a checkpoint"}, tmp_path / "step-00000001.pt")
    (tmp_path / "step-00000002.pt").write_bytes(b"garbage")
    assert store.latest() is None


def test_sigkill_mid_training_then_rerun_matches_uninterrupted(
    long_training: tuple[Path, dict, dict], tmp_path: Path
) -> None:
    mirror, settings, reference = long_training

    work = tmp_path / "killed"
    work.mkdir()
    command = [sys.executable, str(FLOW_SCRIPT), *tiny_args(**settings), "--mirror", str(mirror)]
    process = subprocess.Popen(command, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_while_running(process, lambda: list(work.glob("runs/*/train-*/checkpoints/step-00000600.pt")),
                           "the checkpoint at step 600 appeared", 120, interval=0.01)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert not list(work.glob("runs/*/train-*/training.json")), "training finished before the kill"
    [record] = work.glob("runs/*/.flow-run.json")  # the killed run's flow run, which it could not end
    killed = json.loads(record.read_text())["flow_run_id"]

    rerun = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Resuming from" in rerun.stdout + rerun.stderr
    # Prefect's record is true: the killed run Crashed, none of its task runs left Running.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        assert client.read_flow_run(killed).state.type.value == "CRASHED"
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[killed])))
    assert task_runs and all(run.state.is_final() for run in task_runs)
    # Only what was going is Crashed: the stages the killed run had finished stay Completed.
    assert {run.name.split()[0] for run in task_runs if run.state.is_completed()} >= {"download", "inspect"}
    assert not list(work.glob("runs/*/.flow-run.json"))
    train_dir = next(work.glob("runs/*/train-*"))
    resumed = torch.load(train_dir / "model.pt", weights_only=True)["model"]
    assert same_weights(resumed, final_weights(reference))
    assert loss_steps(train_dir.parent) == expected_loss_steps(settings, train_size=4000)


def test_ctrl_c_and_sigterm_end_in_one_line_and_the_rerun_resumes_bitwise(
    long_training: tuple[Path, dict, dict], tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    mirror, settings, reference = long_training
    work = tmp_path / "interrupted"
    work.mkdir()
    command = [sys.executable, str(FLOW_SCRIPT), *tiny_args(**settings), "--mirror", str(mirror), "--experiment", "ctrl-c"]
    # Ctrl-C reaches the whole process group, as a terminal sends it; SIGTERM, as a supervisor sends it, the process.
    for number, status, step in ((signal.SIGINT, 130, 600), (signal.SIGTERM, 143, 1200)):
        process = subprocess.Popen(command, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        try:
            wait_while_running(process, lambda step=step: list(work.glob(f"runs/*/train-*/checkpoints/step-{step:08d}.pt")),
                               f"the checkpoint at step {step} appeared", 120, interval=0.01)
            if number == signal.SIGINT:
                os.killpg(process.pid, number)
            else:
                process.send_signal(number)
            _, stderr = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        assert process.returncode == status, stderr[-3000:]
        assert "Traceback" not in stderr
        last = stderr.strip().splitlines()[-1]
        assert last.startswith(f"fashion.py: interrupted by {number.name}; the checkpoint at step ") and last.endswith(
            " is kept, and the same command resumes"), last
        assert int(last.split("at step ")[1].split()[0]) >= step
    rerun = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    train_dir = next(work.glob("runs/ctrl-c/train-*"))
    assert same_weights(torch.load(train_dir / "model.pt", weights_only=True)["model"], final_weights(reference))
    assert loss_steps(train_dir.parent) == expected_loss_steps(settings, train_size=4000)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["ctrl-c"])))
    assert sorted(run.state.type.value for run in runs) == ["COMPLETED", "CRASHED", "CRASHED"]


def test_refreshed_training_that_fails_resumes_on_retry(
    uninterrupted: dict, synthetic_mirror: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # --refresh train discards the old checkpoints once; the retry after a fault must not discard the new ones.
    monkeypatch.setenv("FASHION_FAULT", "train:26")  # a point no other test uses: each fires once per process
    result = run_tiny_flow(tmp_path / "reference", synthetic_mirror, refresh=["train"])
    assert "(step 15)" in caplog.text
    assert same_weights(final_weights(result), final_weights(uninterrupted))


def test_last_partial_batch_and_a_figure_of_fewer_images(prefect_api_url: str, synthetic_mirror: Path, tmp_path: Path) -> None:
    # 160 images in batches of 3: 53 full batches and one of a single image, logged at step 54.
    result = run_tiny_flow(tmp_path, synthetic_mirror, batch_size=3, epochs=1, log_every=27, checkpoint_every=20,
                           optimizer="adam", schedule="onecycle", lr=0.005)
    runs = load_runs(Path(result["train_dir"]).parent)
    assert scalar_steps(runs, training_run(runs), "training loss") == [27, 54]
    assert image_steps(runs, training_run(runs), "predictions vs. actuals") == [27, 54]


def test_more_epochs_continue_the_shorter_training(
    finished_run: tuple[Path, dict], synthetic_mirror: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    one = run_tiny_flow(tmp_path, synthetic_mirror, experiment="grow", epochs=1)
    shorter = Path(one["train_dir"])
    before = {path.name: path.stat().st_mtime_ns for path in shorter.rglob("*") if path.is_file()}
    two = run_tiny_flow(tmp_path, synthetic_mirror, experiment="grow")  # TINY: 2 epochs
    longer = Path(two["train_dir"])
    assert longer != shorter
    epoch = total_steps(TINY | {"epochs": 1})
    assert f"Continuing from {shorter}/checkpoints/step-{epoch:08d}.pt (epoch 1, step {epoch})" in caplog.text
    # Bitwise the 2-epoch training made from scratch; the 1-epoch one left as it was.
    assert same_weights(final_weights(two), final_weights(finished_run[1]))
    assert {path.name: path.stat().st_mtime_ns for path in shorter.rglob("*") if path.is_file()} == before
    # Its own TensorBoard run shows the whole curve, each point once; what this run trained is epoch 2 only.
    runs = load_runs(longer)
    assert scalar_steps(runs, ".", "training loss") == expected_loss_steps()
    written_here = [path for path in longer.glob("events.out.tfevents.*.training") if path.name not in before]
    [own] = written_here
    assert event_steps(own) and min(event_steps(own)) > epoch


def test_one_cycle_starts_over_and_says_why(
    synthetic_mirror: Path, prefect_api_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_tiny_flow(tmp_path, synthetic_mirror, experiment="cycle", epochs=1, schedule="onecycle")
    run_tiny_flow(tmp_path, synthetic_mirror, experiment="cycle", schedule="onecycle")
    assert "Starting over instead of continuing" in caplog.text and "the onecycle schedule depends on" in caplog.text
    assert "Continuing from" not in caplog.text


def event_steps(path: Path) -> list[int]:
    """The steps of the training loss in one event file."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [event.step for event in EventFileLoader(str(path)).Load()
            if any(value.tag == "training loss" for value in event.summary.value)]


def test_augmented_training_resumes_exactly(
    finished_run: tuple[Path, dict], synthetic_mirror: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The augmentation's draws are in the checkpoint: a resumed training draws the same shifts and flips.
    # (finished_run first: alone, the test's own first flow run would set up Prefect's logging, and caplog see nothing.)
    settings = {"augment": True, "label_smoothing": 0.1}
    reference = run_tiny_flow(tmp_path / "reference", synthetic_mirror, **settings)
    # Between the checkpoints at steps 15 and 30; a point of its own, as each fires once per process.
    monkeypatch.setenv("FASHION_FAULT", "train:27")
    resumed = run_tiny_flow(tmp_path / "faulty", synthetic_mirror, **settings)
    assert "Resuming from" in caplog.text and "(step 15)" in caplog.text
    assert same_weights(final_weights(resumed), final_weights(reference))


def test_channels_last_training_resumes_exactly(
    finished_run: tuple[Path, dict], synthetic_mirror: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Batches of 16 train on oneDNN with the model in channels-last order (the accurate preset's path),
    # here with weight decay, flips only and the test-time flip: 10 steps an epoch, checkpoints every 5.
    settings = {"batch_size": 16, "checkpoint_every": 5, "weight_decay": 1e-3, "augment": True, "augment_shift": 0,
                "test_time_flip": True}
    reference = run_tiny_flow(tmp_path / "reference", synthetic_mirror, **settings)
    monkeypatch.setenv("FASHION_FAULT", "train:13")  # between the checkpoints at steps 10 and 15
    resumed = run_tiny_flow(tmp_path / "faulty", synthetic_mirror, **settings)
    assert "Resuming from" in caplog.text and "(step 10)" in caplog.text
    assert same_weights(final_weights(resumed), final_weights(reference))
    assert resumed["test_accuracy"] == reference["test_accuracy"]
