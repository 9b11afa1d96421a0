"""Sweeps fanned out on a Dask cluster of worker processes on loopback: results, comparison, failures, reruns."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from fashion_pipeline.flows.sweep_command_line import main
from fashion_pipeline.tasks.download import download
from fashion_pipeline.tasks.ml.hyperparameters import Hyperparameters
from fashion_pipeline.tasks.sweep.plan import plan
from fashion_pipeline.tasks.train import train, training_dir
from tests.helpers import REPO, TINY, VALIDATION, final_weights, free_port, run_tiny_flow, same_weights, tiny_args
from tests.tensorboard_reader import load_runs


@pytest.fixture(scope="module")
def dask_address(prefect_api_url: str, synthetic_folder: Path) -> Iterator[str]:
    """A Dask scheduler and two single-threaded worker processes on loopback, shared by this module's sweeps."""
    from distributed import LocalCluster

    with pytest.MonkeyPatch.context() as patch:
        # Set before the workers start: they inherit this environment (PREFECT_API_URL and PREFECT_HOME are in it too).
        patch.setenv("FASHION_MNIST_CHECKSUMS", str(synthetic_folder / "checksums.json"))
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0") as cluster:
            yield cluster.scheduler_address


def sweep_args(root: Path, mirror: Path, address: str) -> list[str]:
    """Folders under `root`, the synthetic mirror, the cluster and the tiny settings as base values."""
    return ["--runs-dir", str(root / "runs"), "--data-dir", str(root / "data"), "--mirror", str(mirror),
            "--dask-address", address, *tiny_args(validation_size=VALIDATION)]


def read_summary(root: Path, name: str) -> dict:
    return json.loads((root / "runs" / name / "sweep.json").read_text())


def test_sweep_runs_every_configuration_and_names_the_best(
    dask_address: str, synthetic_folder: Path, tmp_path: Path
) -> None:
    rates = [0.002, TINY["lr"], 0.2]
    assert main(["--name", "sweep1", "--grid", json.dumps({"lr": rates}),
                 *sweep_args(tmp_path, synthetic_folder, dask_address)]) == 0

    sweep_dir = tmp_path / "runs" / "sweep1"
    summary = read_summary(tmp_path, "sweep1")
    entries = summary["configurations"]
    assert [entry["name"] for entry in entries] == [f"lr={rate}" for rate in rates]
    accuracies, train_dirs = {}, set()
    for entry, rate in zip(entries, rates):
        run_dir = sweep_dir / entry["name"]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert entry["state"] == "Completed" and "error" not in entry
        assert metrics["parameters"]["lr"] == rate and metrics["parameters"]["experiment"] == f"sweep1/{entry['name']}"
        assert entry["test_accuracy"] == metrics["test_accuracy"] and entry["mean_ap"] == metrics["mean_ap"]
        assert entry["validation_accuracy"] == metrics["validation_accuracy"]
        train_dir = Path(metrics["train_dir"])
        assert train_dir.parent == run_dir
        for name in ("inspect.json", "graph.json", "summary.png", "projector_config.pbtxt"):
            assert (run_dir / name).is_file(), name
        for name in ("training.json", "model.pt", "evaluation.json", "metrics.json", "confusion_matrix.png"):
            assert (train_dir / name).is_file(), name
        accuracies[entry["name"]] = metrics["validation_accuracy"]
        train_dirs.add(train_dir)
    assert len(train_dirs) == len(rates)
    best = max(accuracies.values())  # chosen on validation: the test accuracy is only reported
    assert summary["metric"] == "validation_accuracy"
    assert summary["best"]["name"] == next(name for name, accuracy in accuracies.items() if accuracy == best)
    assert summary["best"]["validation_accuracy"] == best and summary["failed"] == 0
    # Each worker process trains alone, so a run's weights are those of the same run made by flows/fashion.py.
    single = run_tiny_flow(tmp_path / "single", synthetic_folder, validation_size=VALIDATION)
    [twin] = [entry for entry in entries if Path(entry["train_dir"]).name == Path(single["train_dir"]).name]
    assert twin["values"] == {"lr": TINY["lr"]} and same_weights(final_weights(twin), final_weights(single))

    # TensorBoard's HPARAMS tab, pointed at the sweep, holds one session per configuration.
    from tensorboard.plugins.hparams import metadata

    sessions = {run: metadata.parse_session_start_info_plugin_data(tags[metadata.SESSION_START_INFO_TAG])
                for run, tags in load_runs(sweep_dir).PluginRunToTagToContent(metadata.PLUGIN_NAME).items()
                if metadata.SESSION_START_INFO_TAG in tags}
    assert sorted(session.hparams["lr"].number_value for session in sessions.values()) == rates
    assert {str(sweep_dir / run) for run in sessions} == {str(path) for path in train_dirs}

    # In the Prefect UI: the sweep's run named after it, each stage's run after its configuration.
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["sweep sweep1"])))
        names = {task_run.name: task_run for task_run in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))}
    assert "fashion-mnist" in run.tags
    assert {f"train lr={rate}" for rate in rates} <= set(names)
    assert "cpu" not in names[f"train lr={rates[0]}"].tags  # a device tag on accelerators only


def test_failing_configuration_is_reported_and_rerun_trains_only_it(
    dask_address: str, synthetic_folder: Path, tmp_path: Path
) -> None:
    configurations = [{"lr": 0.01}, {"lr": 0.05, "seed": 1}, {"lr": 0.1}]
    args = ["--name", "sweep2", "--configurations", json.dumps(configurations),
            *sweep_args(tmp_path, synthetic_folder, dask_address)]
    # A fault in one configuration only: a file where its training folder goes, so its train stage always fails.
    base = TINY | {"runs_dir": str(tmp_path / "runs"), "data_dir": str(tmp_path / "data"), "mirror": str(synthetic_folder),
                   "validation_size": VALIDATION}
    failing = plan("sweep2", base, configurations=configurations)[2]
    dataset = download(base["data_dir"], mirror=base["mirror"])
    blocker = training_dir(dataset, str(failing.config.run_dir), Hyperparameters.of(failing.config), failing.device)
    blocker.parent.mkdir(parents=True)
    blocker.write_text("in the way")

    assert main(args) == 1
    summary = read_summary(tmp_path, "sweep2")
    names = ["lr=0.01,seed=0", "lr=0.05,seed=1", "lr=0.1,seed=0"]
    assert [entry["name"] for entry in summary["configurations"]] == names
    done, failed = summary["configurations"][:2], summary["configurations"][2]
    assert [entry["state"] for entry in done] == ["Completed", "Completed"]
    assert failed["state"] == "Failed" and failed["stages"]["train"] == "Failed"
    assert failed["error"].startswith("train: FileExistsError") and blocker.name in failed["error"]
    assert summary["best"]["name"] == max(done, key=lambda entry: entry["validation_accuracy"])["name"]
    assert_table_reports(summary, attempts=1 + train.task.retries)

    trained = {entry["name"]: (Path(entry["train_dir"]) / "training.json").stat().st_mtime_ns for entry in done}
    blocker.unlink()
    assert main(args) == 0
    rerun = read_summary(tmp_path, "sweep2")
    assert [entry["state"] for entry in rerun["configurations"]] == ["Completed"] * 3
    for entry in rerun["configurations"]:
        fresh = "Completed" if entry["name"] == failed["name"] else "Cached"
        expected = {"download": "Cached", "inspect": "Cached", "graph": "Cached", "train": fresh,
                    "checkpoint": fresh, "evaluate": fresh, "report": "Completed"}
        assert entry["stages"] == expected, entry["name"]
    assert {name: (Path(entry["train_dir"]) / "training.json").stat().st_mtime_ns
            for entry in rerun["configurations"] if (name := entry["name"]) in trained} == trained


def assert_table_reports(summary: dict, attempts: int) -> None:
    """The sweep's table artifact has a row per configuration with its state and cause; the failure was retried."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName,
        TaskRunFilterState, TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sweep2-sweep"])),
                                           sort=ArtifactSort.UPDATED_DESC, limit=1)
        failed_trains = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[artifact.flow_run_id])),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="train"),
                                          state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.FAILED]))),
        )
    rows = json.loads(artifact.data)
    assert [(row["lr"], row["state"], row["error"]) for row in rows] == [
        (entry["values"]["lr"], entry["state"], entry.get("error", "")) for entry in summary["configurations"]
    ]
    assert [run.run_count for run in failed_trains] == [attempts]


def test_sweep_takes_the_mirror_from_a_prefect_variable(dask_address: str, synthetic_folder: Path,
                                                        tmp_path: Path) -> None:
    # As a single run does (tests/test_download.py): a sweep that names no mirror takes the server's Variable.
    from prefect.variables import Variable

    from fashion_pipeline.flows.fashion import MIRROR_VARIABLE

    args = sweep_args(tmp_path, synthetic_folder, dask_address)
    at = args.index("--mirror")
    Variable.set(MIRROR_VARIABLE, str(synthetic_folder), overwrite=True)
    try:
        assert main(["--name", "variable", "--grid", json.dumps({"lr": [0.01]}), *args[:at], *args[at + 2:]]) == 0
    finally:
        Variable.unset(MIRROR_VARIABLE)
    [entry] = read_summary(tmp_path, "variable")["configurations"]
    assert entry["state"] == "Completed" and entry["stages"]["download"] == "Cached"  # the sweep's own download
    assert (tmp_path / "data" / "FashionMNIST" / "dataset.json").is_file()


@pytest.mark.parametrize("grid, message", [
    ({"lr": [0.01, 20]}, 'configuration {"lr": 20}: --lr'),
    ({"data_dir": ["a", "b"]}, "data_dir cannot vary within a sweep"),
])
def test_bad_configuration_is_one_line_before_any_work(
    grid: dict, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--grid", json.dumps(grid), "--runs-dir", str(tmp_path / "runs"), "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("address, message", [
    ("tcp://127.0.0.1:{port}", "no Dask scheduler answers there"),
    ("tcp://127.0.0.1", "missing port number"),
])
def test_unreachable_scheduler_is_one_line_before_any_work(
    address: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = address.format(port=free_port())  # nothing listens there
    arguments = ["--grid", '{"lr": [0.01]}', "--dask-address", address, "--runs-dir", str(tmp_path / "runs")]
    assert main([*arguments, "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert f"--dask-address {address}: {message}" in error and error.count("\n") == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("cluster, message", [
    (["--dask-cluster", "no_such_package.Cluster"], "--dask-cluster no_such_package.Cluster: cannot import no_such_package"),
    (["--dask-cluster", "distributed.NoSuchCluster"], "--dask-cluster distributed.NoSuchCluster: no such class"),
    (["--dask-cluster", "distributed.SpecCluster", "--dask-cluster-kwargs", '{"n_workers": 2}'],
     "--dask-cluster-kwargs: distributed.SpecCluster refuses them: got an unexpected keyword argument 'n_workers'"),
    (["--adapt", "1:2"], "--dask-cluster-kwargs and --adapt are for --dask-cluster"),
])
def test_a_bad_cluster_class_is_one_line_before_any_work(
    cluster: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--grid", '{"lr": [0.01]}', *cluster, "--runs-dir", str(tmp_path / "runs"), "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1, error
    assert not (tmp_path / "runs").exists()


def test_a_gpu_sweep_from_a_cpu_only_client_checks_devices_on_the_workers(
    dask_address: str, synthetic_folder: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from distributed import LocalCluster

    command = [sys.executable, str(REPO / "flows" / "sweep.py"), "--grid", '{"lr": [0.01]}',
               *sweep_args(tmp_path, synthetic_folder, dask_address), "--device", "cuda"]
    # Workers without a GPU: refused in one line, not left waiting for one; this machine's lack of
    # CUDA is not the reason (the client does not train).
    done = subprocess.run([*command, "--name", "cpu-workers"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines()[-1] == ("sweep.py: error: --device cuda: no Dask worker offers the resource GPU; "
                                            "start GPU workers with `dask worker ... --resources GPU=1`")
    # A worker that offers a GPU (as a Dask resource) gets the configuration, and checks its device itself.
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", resources={"GPU": 1},
                      dashboard_address="127.0.0.1:0") as cluster:
        command[command.index(dask_address)] = cluster.scheduler_address
        done = subprocess.run([*command, "--name", "gpu-worker"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    [entry] = read_summary(tmp_path, "gpu-worker")["configurations"]
    assert entry["state"] == "Failed"
    assert entry["error"].startswith("configuration: on Dask worker ")
    assert entry["error"].endswith(": --device cuda: CUDA is not available on this machine")


@pytest.mark.slow
def test_a_sweep_on_a_cluster_class_that_scales(prefect_api_url: str, synthetic_mirror: Path, tmp_path: Path) -> None:
    kwargs = {"n_workers": 1, "threads_per_worker": 1, "processes": True, "dashboard_address": "127.0.0.1:0"}
    assert main(["--name", "scaled", "--grid", '{"lr": [0.01, 0.02]}', "--dask-cluster", "distributed.LocalCluster",
                 "--dask-cluster-kwargs", json.dumps(kwargs), "--adapt", "1:2", "--runs-dir", str(tmp_path / "runs"),
                 "--data-dir", str(tmp_path / "data"), "--mirror", str(synthetic_mirror),
                 *tiny_args(validation_size=VALIDATION)]) == 0
    summary = read_summary(tmp_path, "scaled")
    assert [entry["state"] for entry in summary["configurations"]] == ["Completed", "Completed"]


@pytest.mark.slow
def test_local_sweep_serves_its_dask_dashboard_and_writes_a_report(prefect_api_url: str, synthetic_mirror: Path,
                                                                   tmp_path: Path) -> None:
    import re
    import subprocess
    import sys

    import httpx

    report = tmp_path / "dask-report.html"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "flows" / "sweep.py"), "--grid", json.dumps({"lr": [0.01, 0.05]}), "--workers", "2",
         "--dask-report", str(report), "--runs-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"),
         "--mirror", str(synthetic_mirror), *tiny_args(epochs=20, validation_size=VALIDATION)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in process.stdout:  # the dashboard's address is logged as the cluster starts
            if found := re.search(r"The Dask dashboard is available at (http://127\.0\.0\.1:\d+/status)", line):
                break
        else:
            pytest.fail("the sweep logged no dashboard address")
        with httpx.Client(trust_env=False) as client:
            page = client.get(found.group(1), timeout=10)  # while the sweep runs
        assert page.status_code == 200 and "Dask" in page.text
        output = process.stdout.read()
        assert process.wait(timeout=300) == 0, output[-3000:]
        # Quiet to the end: the cluster's workers end by themselves, none killed with a warning.
        noisy = [line for line in output.splitlines() if "WARNING" in line or "ERROR" in line]
        assert not noisy, noisy
    finally:
        if process.poll() is None:
            process.kill()
    assert report.stat().st_size > 10_000 and "Dask Performance Report" in report.read_text()


@pytest.mark.slow
def test_halving_trains_the_expected_steps_and_resumes_after_sigkill(prefect_api_url: str, synthetic_mirror: Path,
                                                                     tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    from fashion_pipeline.tasks.plumbing.polling import wait_for
    from tests.synthetic import TRAIN_SIZE

    rates = [0.002, 0.01, 0.02, 0.2]
    command = [sys.executable, str(REPO / "flows" / "sweep.py"), "--name", "halving", "--grid", json.dumps({"lr": rates}),
               "--halving", "2", "--workers", "2", "--runs-dir", str(tmp_path / "runs"), "--data-dir",
               str(tmp_path / "data"), "--mirror", str(synthetic_mirror), *tiny_args(validation_size=VALIDATION)]
    epoch = (TRAIN_SIZE - VALIDATION) // TINY["batch_size"]  # steps of one epoch
    sweep_dir = tmp_path / "runs" / "halving"

    def second_rung_training() -> list[Path]:  # a checkpoint of rung 2 past the continued one
        return [path for path in sweep_dir.glob("*/train-*/checkpoints/step-*.pt")
                if int(path.stem.removeprefix("step-")) > epoch]

    # Killed with its workers (as by a crash) once rung 2 trains, then run again: it resumes.
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        wait_for(lambda: second_rung_training() or process.poll() is not None, "rung 2 training", 300, interval=0.1)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    summary = json.loads((sweep_dir / "sweep.json").read_text())
    [first, second] = summary["rungs"]
    assert (first["epochs"], second["epochs"]) == (1, 2) and len(first["trained"]) == 4
    assert second["trained"] == first["promoted"] and len(first["promoted"]) == 2
    ranked = sorted(first["trained"], key=lambda name: -first["validation_accuracy"][name])
    assert first["promoted"] == ranked[:2]
    assert summary["best"]["name"] in second["trained"] and summary["best"]["epochs"] == 2
    # Exactly the expected steps: one epoch for each of the four, one more for each promoted one,
    # which continued its own first epoch (no training of another length exists).
    trainings = {path.parent.name: json.loads(path.read_text()) for path in sweep_dir.glob("*/train-*/training.json")}
    steps = sorted((training["hyperparameters"]["epochs"], training["global_step"]) for training in trainings.values())
    assert steps == [(1, epoch)] * 4 + [(2, 2 * epoch)] * 2
    # The rerun trained nothing twice: the first rung came from the cache, rung 2 resumed where it was killed.
    dropped = [entry for entry in summary["configurations"] if entry["name"] not in second["trained"]]
    assert [entry["stages"]["train"] for entry in dropped] == ["Cached", "Cached"]
    assert "Resuming from" in done.stderr

    # --refresh train retrains the first rung; rung 2 is still the continuation of rung 1, so it stays.
    refreshed = subprocess.run([*command, "--refresh", "train"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert refreshed.returncode == 0, refreshed.stderr[-3000:]
    again = json.loads((sweep_dir / "sweep.json").read_text())
    assert again["rungs"] == summary["rungs"]
    trains = {entry["name"]: entry["stages"]["train"] for entry in again["configurations"]}
    assert trains == {name: "Cached" if name in second["trained"] else "Completed" for name in first["trained"]}


def _worker_threads() -> tuple[str, int]:
    import os

    from fashion_pipeline.tasks.ml.devices import cpu_threads

    return os.environ["OMP_NUM_THREADS"], cpu_threads(64)


@pytest.mark.slow
def test_local_cluster_offers_the_gpu_and_shares_out_the_cores(prefect_api_url: str) -> None:
    """A CUDA configuration asks for `GPU=1`: on the local cluster it must find a worker offering it, not
    wait forever; and each worker trains on its share of the cores, not on the one Dask would give it."""
    import os

    import dask
    from prefect import flow, task

    from fashion_pipeline.tasks.plumbing.dask_cluster import local_runner

    threads = task(_worker_threads)

    @flow(task_runner=local_runner(1, gpu=True))  # one worker: every core is its share
    def on_the_cluster() -> tuple[str, int]:
        with dask.annotate(resources={"GPU": 1}):
            return threads.submit().result(timeout=120)

    cores = len(os.sched_getaffinity(0))
    assert on_the_cluster() == (str(cores), cores)
