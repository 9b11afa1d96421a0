"""Runs and data in an object store: a real S3 API on loopback (rclone), reached with s3fs as users do.

Each test's `bucket` comes with a mirror cache of its own; a run given another FASHION_STORE_CACHE
is a run on another machine, which shares nothing with the first but the store.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from fashion_pipeline.flows.sweep_command_line import main as sweep_main
from fashion_pipeline.tasks.config import ConfigError, parse_config
from fashion_pipeline.tasks.ml.dataset import CLASSES
from fashion_pipeline.tasks.plumbing import storage
from tests.helpers import (
    FLOW_SCRIPT,
    REPO,
    VALIDATION,
    expected_loss_steps,
    final_weights,
    free_port,
    run_flow_script,
    run_tiny_flow,
    same_weights,
    tiny_args,
    total_steps,
    wait_while_running,
)
from tests.object_store import listing, load_weights, read_bytes
from tests.synthetic import write_synthetic_fashion_mnist
from tests.tensorboard_reader import image_steps, load_runs, scalar_steps, training_run

STAGES = ("download", "inspect", "graph", "train", "checkpoint", "evaluate")


def test_store_urls_map_to_a_local_mirror_and_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    mirror = storage.local_path("s3://bucket/runs/exp")
    assert mirror == tmp_path / "cache" / "s3" / "bucket" / "runs" / "exp"
    assert storage.location_of(mirror / "train-1" / "model.pt") == "s3://bucket/runs/exp/train-1/model.pt"
    assert storage.local_path("runs/exp") == Path("runs/exp") and storage.location_of(Path("runs/exp")) == "runs/exp"
    assert storage.join("s3://bucket/runs/", "a/b") == "s3://bucket/runs/a/b"
    # file:// is a local folder: the fast path, with no mirror.
    config = parse_config({"runs_dir": f"file://{tmp_path}/runs", "data_dir": f"file://{tmp_path}/data"})
    assert config.run_dir == str(tmp_path / "runs" / "fashion_mnist_experiment_1")


@pytest.mark.parametrize(("url", "message"), [
    ("gs://bucket/runs", 'the driver for gs:// is not installed: pip install -e ".[gcs]"'),
    ("nosuch://bucket/runs", "unknown storage scheme nosuch://; use a local folder, file://, s3:// or gs://"),
])
def test_a_store_that_cannot_be_used_here_is_one_line(url: str, message: str) -> None:
    if url.startswith("gs://"):
        try:
            import gcsfs  # noqa: F401
        except ImportError:
            pass
        else:
            pytest.skip("gcsfs is installed here")
    with pytest.raises(ConfigError) as refused:
        parse_config({"runs_dir": url})
    assert str(refused.value) == f"--runs-dir {url}: {message}"


def test_missing_bucket_and_refused_credentials_are_one_line_before_any_work(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "submit"
    work.mkdir()
    done = run_flow_script("--runs-dir", "s3://no-such-bucket/runs", cwd=work, timeout=120)
    assert done.returncode == 2
    assert done.stderr == "fashion.py: error: --runs-dir s3://no-such-bucket/runs: bucket 'no-such-bucket' does not exist\n"
    assert list(work.iterdir()) == []

    import s3fs

    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    s3fs.S3FileSystem.clear_instance_cache()  # as in a new process, which reads the credentials anew
    with pytest.raises(ConfigError, match=rf"^--data-dir {bucket}/data: the store refused these credentials"):
        parse_config({"data_dir": f"{bucket}/data"})
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    s3fs.S3FileSystem.clear_instance_cache()  # not the refused client, for the tests after this one
    assert listing(bucket) == []


def test_a_run_on_the_store_shows_every_tab_and_reruns_cached_on_another_machine(
    prefect_api_url: str, synthetic_mirror: Path, bucket: str, tmp_path: Path
) -> None:
    work = tmp_path / "submit"
    work.mkdir()
    folders = ["--runs-dir", f"{bucket}/runs", "--data-dir", f"{bucket}/data", "--experiment", "tiny"]
    first = run_flow_script(*folders, "--mirror", str(synthetic_mirror), *tiny_args(), cwd=work)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"Run directory: {bucket}/runs/tiny\n" in first.stdout
    assert list(work.iterdir()) == []  # everything went to the store

    run_dir = f"{bucket}/runs/tiny"
    runs = load_runs(run_dir)  # TensorBoard's own reader, on the store
    train = training_run(runs)
    assert image_steps(runs, ".", "four_fashion_mnist_images") == [0] and runs.Runs()["."]["graph"] is True
    assert scalar_steps(runs, train, "training loss") == expected_loss_steps()
    assert image_steps(runs, train, "predictions vs. actuals") == expected_loss_steps()
    assert sorted(runs.PluginRunToTagToContent("pr_curves")[train]) == sorted(CLASSES)
    assert image_steps(runs, train, "confusion matrix") == [total_steps()]
    assert runs.PluginRunToTagToContent("hparams")[train]
    assert b"metadata.tsv" in read_bytes(f"{run_dir}/projector_config.pbtxt")
    objects = listing(run_dir)
    assert {"00000/default/sprite.png", "metrics.json", "summary.png", f"{train}/model.pt"} <= set(objects)
    assert not [name for name in objects if ".lease" in name or ".tmp" in name]

    # Another machine: a new mirror cache, and no mirror to download from. Every stage is found Cached.
    again = run_flow_script(*folders, *tiny_args(), cwd=work, env={storage.CACHE_ENV: str(tmp_path / "another")})
    assert again.returncode == 0, again.stderr[-3000:]
    stages = json.loads(read_bytes(f"{run_dir}/metrics.json"))["stages"]
    assert {stage: stages[stage] for stage in STAGES} == dict.fromkeys(STAGES, "Cached")
    assert list(work.iterdir()) == []


def test_a_killed_run_on_the_store_resumes_on_another_machine_bitwise(
    long_training: tuple[Path, dict, dict], bucket: str, tmp_path: Path
) -> None:
    mirror, settings, reference = long_training

    work = tmp_path / "submit"
    work.mkdir()
    run_dir = f"{bucket}/runs/killed"
    command = [sys.executable, str(FLOW_SCRIPT), "--runs-dir", f"{bucket}/runs", "--data-dir", f"{bucket}/data",
               "--experiment", "killed", "--mirror", str(mirror), *tiny_args(**settings)]
    process = subprocess.Popen(command, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        wait_while_running(process, lambda: any(name.endswith("checkpoints/step-00000600.pt") for name in listing(run_dir)),
                           "the checkpoint at step 600 reached the store", 180, interval=0.05)
        # A second run of the experiment, from another machine, is refused while the first holds the lease.
        busy = run_flow_script(*command[2:], cwd=work, env={storage.CACHE_ENV: str(tmp_path / "busy")}, timeout=120)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert busy.returncode == 1 and busy.stderr.count("\n") == 1 and "is in use by another run" in busy.stderr
    assert not [name for name in listing(run_dir) if name.endswith("training.json")], "training finished before the kill"

    # Resumed on another machine from what the store holds: bitwise the uninterrupted weights, each step once.
    rerun = run_flow_script(*command[2:], cwd=work, env={storage.CACHE_ENV: str(tmp_path / "another")})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Resuming from" in rerun.stderr
    train = next(name for name in listing(run_dir) if name.endswith("/model.pt"))
    assert same_weights(load_weights(f"{run_dir}/{train}"), final_weights(reference))
    runs = load_runs(run_dir)
    assert scalar_steps(runs, training_run(runs), "training loss") == expected_loss_steps(settings, train_size=4000)


# --- a sweep on machines that share no disk ----------------------------------------------------------


@dataclass
class PrivateCluster:
    """A `dask scheduler` and two `dask worker` processes, each worker in a mount namespace of its own
    where the client's folder (`hidden`) is an empty tmpfs: as on machines that share only the store."""

    address: str
    hidden: Path  # the client's own folder: no worker sees what is in it
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)  # name -> its process group's leader
    threads: dict[str, int] = field(default_factory=dict)  # name -> OMP_NUM_THREADS


@pytest.fixture(scope="module")
def private_cluster(prefect_api_url: str, s3_endpoint: Path, synthetic_folder: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateCluster]:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to give each worker a disk of its own")
    root = tmp_path_factory.mktemp("cluster")
    hidden, visible = root / "client", root / "shared"
    hidden.mkdir()
    visible.mkdir()
    # The dataset's expected checksums (the synthetic files'), where the workers can read them.
    checksums = shutil.copy(synthetic_folder / "checksums.json", visible / "checksums.json")
    port = free_port()
    processes = [subprocess.Popen(["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                   "--dashboard-address", "127.0.0.1:0"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)]
    cluster = PrivateCluster(f"tcp://127.0.0.1:{port}", hidden)
    try:
        for name, threads in (("w1", 1), ("w2", 2)):
            own = f"{hidden}/{name}"  # inside the worker's tmpfs: its mirror cache and Prefect home
            script = (f'mount -t tmpfs tmpfs "{hidden}" && exec dask worker {cluster.address} --name {name} '
                      f'--nthreads 1 --host 127.0.0.1 --local-directory "{own}/dask"')
            environment = {**os.environ, "OMP_NUM_THREADS": str(threads), storage.CACHE_ENV: f"{own}/cache",
                           "PREFECT_HOME": f"{own}/prefect", "FASHION_MNIST_CHECKSUMS": str(checksums)}
            process = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                       env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       start_new_session=True)
            processes.append(process)
            cluster.workers[name], cluster.threads[name] = process, threads
        from distributed import Client

        with Client(cluster.address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield cluster
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


SWEEP_COMMAND = [sys.executable, str(REPO / "flows" / "sweep.py")]


def sweep_options(cluster: PrivateCluster, runs: str, data: str, mirror: Path, **settings: object) -> list[str]:
    return ["--runs-dir", runs, "--data-dir", data, "--mirror", str(mirror), "--dask-address", cluster.address,
            *tiny_args(**{"validation_size": VALIDATION} | settings)]


def test_local_folders_that_a_worker_cannot_see_are_refused_before_training(
    private_cluster: PrivateCluster, synthetic_mirror: Path
) -> None:
    runs, data = private_cluster.hidden / "runs", private_cluster.hidden / "data"
    done = subprocess.run([*SWEEP_COMMAND, "--name", "unseen", "--grid", '{"lr": [0.01, 0.02]}',
                           *sweep_options(private_cluster, str(runs), str(data), synthetic_mirror)],
                          capture_output=True, text=True, timeout=300)
    error = done.stderr.splitlines()[-1]  # after the flow run's log
    assert done.returncode == 2, done.stderr[-3000:]
    assert error.startswith(f"sweep.py: error: --runs-dir {runs / 'unseen'}: Dask worker w") and "(tcp://127.0.0.1:" in error
    assert "does not see this folder as this machine does" in error
    assert not list(runs.glob("**/train-*")) and not (data / "FashionMNIST").exists()


def test_a_sweep_on_workers_that_share_only_the_store(
    private_cluster: PrivateCluster, synthetic_mirror: Path, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(storage.CACHE_ENV, str(private_cluster.hidden / "cache"))  # the client's, unseen by workers
    rates = [0.01, 0.02, 0.05]
    assert sweep_main(["--name", "shared", "--grid", json.dumps({"lr": rates}),
                       *sweep_options(private_cluster, f"{bucket}/runs", f"{bucket}/data", synthetic_mirror)]) == 0
    summary = json.loads(read_bytes(f"{bucket}/runs/shared/sweep.json"))
    assert [entry["state"] for entry in summary["configurations"]] == ["Completed"] * 3
    best = summary["best"]
    assert best["run_dir"].startswith(f"{bucket}/runs/shared/lr=") and best["train_dir"].startswith(best["run_dir"])
    assert json.loads(read_bytes(f"{best['run_dir']}/metrics.json"))["test_accuracy"] == best["test_accuracy"]
    assert load_weights(f"{best['train_dir']}/model.pt")


def test_a_killed_worker_hands_its_training_to_one_with_other_cores_which_resumes_bitwise(
    private_cluster: PrivateCluster, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distributed import Client

    # Batches of 32, so the thread count matters (1 on w1, 2 on w2); 4000 images, so training lasts.
    mirror = tmp_path / "mirror"
    checksums = write_synthetic_fashion_mnist(mirror, train_size=4000, test_size=200)
    monkeypatch.setenv("FASHION_MNIST_CHECKSUMS", str(checksums))
    for name in private_cluster.workers:  # where the workers read the expected checksums
        shutil.copy(checksums, private_cluster.hidden.parent / "shared" / "checksums.json")
    settings = {"batch_size": 32, "epochs": 8, "log_every": 25, "checkpoint_every": 100}
    run_dir = f"{bucket}/runs/killed/lr=0.02"
    command = [*SWEEP_COMMAND, "--name", "killed",
               "--configurations", '[{"lr": 0.02}]',
               *sweep_options(private_cluster, f"{bucket}/runs", f"{bucket}/data", mirror, **settings)]
    sweep = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, storage.CACHE_ENV: str(private_cluster.hidden / "cache")})
    try:
        wait_while_running(sweep, lambda: any(name.endswith("checkpoints/step-00000200.pt") for name in listing(run_dir)),
                           "the checkpoint at step 200 reached the store", 240, interval=0.05)
        with Client(private_cluster.address, timeout=30) as client:
            names = {address: info["name"] for address, info in client.scheduler_info()["workers"].items()}
            [training] = [names[address] for address, keys in client.processing().items() if keys]
        os.killpg(private_cluster.workers[training].pid, signal.SIGKILL)
        output, _ = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, output[-3000:]
    # A truthful record: the lost attempt's task runs ended Crashed, naming the worker; none runs for ever.
    task_runs = sweep_task_runs("sweep killed")
    assert not [(run.name, run.state_name) for run in task_runs if not run.state.is_final()]
    lost = [run for run in task_runs if run.state.is_crashed()]
    assert lost and all(f"Dask worker {training} (tcp://127.0.0.1:" in run.state.message for run in lost)
    assert {run.name for run in task_runs if run.state.is_completed()} >= {"configuration lr=0.02", "train lr=0.02"}

    train = next(name.removesuffix("/model.pt") for name in listing(run_dir) if name.endswith("/model.pt"))
    final = json.loads(read_bytes(f"{run_dir}/{train}/training.json"))
    state = torch.load(io.BytesIO(read_bytes(f"{run_dir}/{train}/{final['checkpoint']}")), weights_only=True)
    assert state["threads"] == private_cluster.threads[training]  # kept on the worker with the other count
    # The uninterrupted training, here, with the thread count of the worker that started it.
    monkeypatch.setenv("OMP_NUM_THREADS", str(private_cluster.threads[training]))
    reference = run_tiny_flow(tmp_path / "reference", mirror, lr=0.02, validation_size=VALIDATION, **settings)
    assert same_weights(load_weights(f"{run_dir}/{train}/model.pt"), final_weights(reference))
    runs = load_runs(run_dir)
    steps = settings["epochs"] * math.ceil((4000 - VALIDATION) / settings["batch_size"])  # the last batch is partial
    assert scalar_steps(runs, training_run(runs), "training loss") == list(range(25, steps + 1, 25))


def sweep_task_runs(flow_run_name: str) -> list:
    """The task runs of the (one) flow run called `flow_run_name`, as Prefect's API has them."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName

    with get_client(sync_client=True) as client:
        [flow_run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[flow_run_name])))
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))


def test_a_configuration_whose_outputs_this_machine_cannot_see_fails_loudly(tmp_path: Path) -> None:
    from prefect.states import Completed

    from fashion_pipeline.flows.sweep import outcome
    from fashion_pipeline.tasks.sweep.plan import plan

    [trial] = plan("unseen", {"runs_dir": str(tmp_path / "runs"), "device": "cpu"}, configurations=[{"lr": 0.01}])

    class Finished:  # a configuration's future as Prefect hands it back: completed, on a worker's own disk
        state = Completed()

        def wait(self) -> None:
            pass

        def result(self) -> dict:
            return {"stages": {"train": "Completed"}, "validation_accuracy": 0.9, "test_accuracy": 0.9, "mean_ap": 0.9,
                    "train_dir": f"{trial.config.run_dir}/train-0"}

    entry = outcome(trial, Finished())  # type: ignore[arg-type]
    assert entry["state"] == "Failed" and "validation_accuracy" not in entry
    assert entry["error"].startswith(f"configuration: its outputs are not in {trial.config.run_dir} as this machine")
