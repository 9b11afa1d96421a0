"""Hyperparameter sweeps: the Fashion-MNIST pipeline once per configuration, fanned out on Dask.

    python flows/sweep.py --grid '{"lr": [0.001, 0.01], "batch_size": [4, 8]}' --runs-dir runs --mirror DIR
    python flows/sweep.py --configurations '[{"lr": 0.01}, {"optimizer": "adam"}]' --dask-address tcp://HOST:8786

The plan (tasks/sweep/plan.py) checks every configuration before any work; the flow downloads the
dataset once, then runs each configuration's pipeline (tasks/pipeline.py) as one Prefect task on a
Dask worker, rung by rung with successive halving; the results go to sweep.json and a table artifact
(tasks/sweep/results.py).
"""

from __future__ import annotations


if __name__ == "__main__":  # the same as the `fashion-sweep` command: this script runs its module, which exits
    import runpy

    runpy.run_module("fashion_pipeline.flows.sweep_command_line", run_name="__main__")

import contextlib
import uuid
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import dask
from distributed import Client
from prefect import flow, tags, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect_dask import DaskTaskRunner

from fashion_pipeline.flows.fashion import mirror_of
from fashion_pipeline.tasks.config import ConfigError
from fashion_pipeline.tasks.download import download
from fashion_pipeline.tasks.ml.devices import device_type, resolve_device, usable_cores
from fashion_pipeline.tasks.pipeline import StageRunner, in_store, run_pipeline
from fashion_pipeline.tasks.plumbing import storage
from fashion_pipeline.tasks.plumbing.dask_cluster import quiet_size_estimates, task_runner
from fashion_pipeline.tasks.plumbing.failures import RunFailed, ending_the_run, one_line
from fashion_pipeline.tasks.plumbing.files import atomic_write_json
from fashion_pipeline.tasks.plumbing.lock import experiment_lock
from fashion_pipeline.tasks.plumbing.run_record import crash_unfinished_task_runs, recorded_flow_run
from fashion_pipeline.tasks.plumbing.transactions import own_transactions
from fashion_pipeline.tasks.sweep.plan import Trial, plan_sweep, rung_epochs
from fashion_pipeline.tasks.sweep.results import METRIC, REPORTED, describe, promote, publish_table, summarise

WORKER_TAG = "dask-worker:"  # a configuration's stage task runs are tagged with the Dask worker that ran them


class SweepFailed(RunFailed):
    """Some configurations of a sweep did not finish; sweep.json says which and why."""


class ConfigurationFailed(RunFailed):
    """A configuration's pipeline failed: the message names the stage and why; `stages` has each stage's state."""

    def __init__(self, message: str, stages: dict[str, str]) -> None:
        super().__init__(message)
        self.stages = stages

    def __reduce__(self) -> tuple[Any, ...]:  # back from the Dask worker with its stages
        return type(self), (str(self), self.stages)


@task(name="configuration", task_run_name="configuration {trial.name}", cache_policy=NO_CACHE)
def configuration(trial: Trial, mirror: str | None) -> dict[str, Any]:
    """One configuration's pipeline, its stages nested in this task run; its report, with every stage's state."""
    from distributed import get_worker

    worker = get_worker()  # the Dask worker that trains it
    run = StageRunner(trial.config.refresh)
    try:
        device = resolve_device(trial.device)
    except ConfigError as error:
        raise ConfigurationFailed(f"configuration: on Dask worker {worker.name}: {error}", {}) from None
    try:
        # Each stage's task run names the worker it ran on: if that worker is lost, the sweep says which.
        with own_transactions(), tags(f"{WORKER_TAG}{worker_label(worker.name, worker.address)}"):
            result = run_pipeline(trial.config, device, mirror, run)
    except Exception as error:
        raise ConfigurationFailed(f"{run.failed or 'configuration'}: {one_line(error)}", run.states) from error
    return result | {"stages": run.states}


@flow(name="fashion-mnist-sweep", flow_run_name="sweep {name}", log_prints=True, persist_result=True)
def sweep(name: str = "sweep", grid: dict[str, list[Any]] | None = None,
          configurations: list[dict[str, Any]] | None = None, base: dict[str, Any] | None = None,
          halving: int | None = None, dask_address: str | None = None, workers: int | None = None,
          dask_cluster: str | None = None, dask_cluster_kwargs: dict[str, Any] | None = None,
          adapt: list[int] | None = None, dask_report: str | None = None) -> dict[str, Any]:
    """Run the pipeline for every configuration in parallel on Dask, sharing one download; write the comparison.

    Plain JSON values, as a deployment passes them, with the meaning of `fashion-sweep`'s options:

    Args:
        name: the sweep's folder under the runs dir; each configuration's run is `<name>/<varied values>`.
        grid: parameter -> list of values; every combination runs. Or:
        configurations: a list of parameter overrides, one run each.
        base: the values every configuration starts from (`fashion`'s parameters: runs_dir, epochs, ...).
        halving: successive halving's ETA: every configuration trains for the first rung's epochs, the
            best 1/ETA by validation accuracy continue to the next rung, and so on up to the full epochs.
        dask_address: an existing Dask scheduler (tcp://HOST:PORT). Or:
        workers: the worker processes of a temporary cluster on this machine (default: one per core). Or:
        dask_cluster: a cluster class that starts the workers (dask_jobqueue.SLURMCluster, ...), given
            `dask_cluster_kwargs` and scaling between `adapt` [MIN, MAX] workers.
        dask_report: a file for Dask's performance report.

    Returns the content of `<runs-dir>/<name>/sweep.json`; raises SweepFailed, after writing it,
    when a configuration failed (its retries spent). A bad plan fails in one line before any work.
    """
    with ending_the_run():
        trials, cluster = plan_sweep(name, base or {}, grid, configurations, halving, dask_address, workers,
                                     dask_cluster, dask_cluster_kwargs, adapt)
    cuda = any(on_cuda(trial) for trial in trials)
    # On this machine CUDA trainings take turns on its GPU, as they never share one; --workers N lets N share it.
    with task_runner(dask_address, workers or (1 if cuda else min(len(trials), usable_cores())), dask_report,
                     gpu=cuda, cluster=cluster) as runner:
        if dask_report:
            quiet_size_estimates(runner.client)
        return run_trials(runner, name, trials, halving)


def run_trials(runner: DaskTaskRunner, name: str, trials: list[Trial], halving: int | None) -> dict[str, Any]:
    """The sweep of the checked `trials` on the started `runner`'s cluster; its summary (see `sweep`)."""
    shared = trials[0].config
    sweep_dir = storage.join(shared.runs_dir, name)
    with ExitStack() as locks:
        for folder in (sweep_dir, *(trial.config.run_dir for trial in trials)):
            locks.enter_context(experiment_lock(folder))
        locks.enter_context(recorded_flow_run(sweep_dir))  # the sweep's flow run holds its configurations' task runs
        check_shared_folders(runner.client, {"--runs-dir": sweep_dir, "--data-dir": shared.data_dir})
        check_gpu_workers(runner.client, trials)
        mirror = mirror_of(shared)
        # The one download, before fanning out: its failure fails the sweep once, not every configuration.
        in_store(download.task, shared.data_dir)(data_dir=shared.data_dir, mirror=mirror,
                                                 refresh="download" in shared.refresh)
        latest: dict[str, dict[str, Any]] = {}  # each configuration's entry at the last rung it reached
        rungs, alive = [], trials
        for epochs in rung_epochs(shared.epochs, halving):
            rung = [at_epochs(trial, epochs, first=not rungs) for trial in alive]
            futures = [submit(runner, trial, mirror) for trial in rung]
            entries = [outcome(trial, future) for trial, future in zip(rung, futures)]
            close_lost_attempts(runner.client)
            for entry in entries:
                print(describe(entry))
                latest[entry["name"]] = entry
            promoted = promote(entries, halving) if epochs < shared.epochs else []
            rungs.append({"epochs": epochs, "trained": [entry["name"] for entry in entries], "promoted": promoted,
                          METRIC: {entry["name"]: entry.get(METRIC) for entry in entries}})
            alive = [trial for trial in alive if trial.name in promoted]
        entries = [latest[trial.name] for trial in trials]
        summary = summarise(name, trials, entries) | ({"halving": halving, "rungs": rungs} if halving else {})
        storage.publish_files([atomic_write_json(storage.local_path(sweep_dir) / "sweep.json", summary)])
        publish_table(name, entries)
    failed = [entry for entry in entries if entry["state"] != "Completed"]
    if failed:
        raise SweepFailed(f"{len(failed)} of {len(entries)} configurations failed ({failed[0]['name']}: "
                          f"{failed[0]['error']}); see {storage.join(sweep_dir, 'sweep.json')}")
    return summary


def close_lost_attempts(client: Client) -> None:
    """Mark `Crashed`, naming the worker, each task run left unfinished by a Dask worker that is gone.

    Dask runs a lost worker's configuration again on another worker, but the lost attempt's task
    runs never end by themselves; without this the record would show them running for ever. Each
    stage's task run carries its worker's label (`configuration`), and the scheduler knows the living workers'.
    """
    alive = {worker_label(worker["name"], address) for address, worker in client.scheduler_info()["workers"].items()}

    def message(task_run: TaskRun) -> str | None:
        worker = next((tag.removeprefix(WORKER_TAG) for tag in task_run.tags if tag.startswith(WORKER_TAG)), None)
        if worker is None or worker in alive:
            return None
        return f"Its Dask worker {worker} was lost during this attempt; Dask ran the configuration again on another worker."

    try:
        if lost := crash_unfinished_task_runs(flow_run.id, message):
            print(f"Marked {lost} task runs of attempts on lost Dask workers Crashed")
    except Exception as error:  # noqa: BLE001  (the record is for people to read: a failure to mend it never fails the sweep)
        print(f"Could not mark the task runs of lost Dask workers Crashed: {one_line(error)}")


def worker_label(name: object, address: str) -> str:
    """A Dask worker as its stages' tag names it: `w1 (tcp://10.0.0.7:40111)`, or its address when it has
    no other name. The address tells a restarted worker from its lost predecessor."""
    return address if str(name) == address else f"{name} ({address})"


def check_gpu_workers(client: Client, trials: list[Trial]) -> None:
    """A ConfigError, before any training, when configurations need a GPU and no worker of the cluster
    offers one (Dask would keep them waiting for ever); a cluster with no worker yet (scaling up) is
    left to start them."""
    if not any(on_cuda(trial) for trial in trials):
        return
    workers = client.scheduler_info()["workers"].values()
    if workers and not any(worker.get("resources", {}).get("GPU") for worker in workers):
        raise ConfigError("--device cuda: no Dask worker offers the resource GPU; start GPU workers with "
                          "`dask worker ... --resources GPU=1`")


def check_shared_folders(client: Client, folders: dict[str, str]) -> None:
    """A ConfigError, before any training, unless every Dask worker sees these local folders as this
    process does: a probe written here must be read there. Folders in a store need no probe.

    Without it, a worker on a machine without the shared disk would write its outputs where this
    process never looks, or fail on a missing dataset with an error that blames something else.

    Args:
        folders: the option that names each folder ("--runs-dir") -> the folder.
    """
    local = {flag: Path(folder) for flag, folder in folders.items() if not storage.is_remote(folder)}
    if not local:
        return
    token = uuid.uuid4().hex
    probes = {flag: folder / f".probe-{token}" for flag, folder in local.items()}
    for probe in probes.values():
        probe.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(probe, token)
    try:
        unseen = client.run(_unseen_probes, [str(probe) for probe in probes.values()], token)
        names = {address: worker["name"] for address, worker in client.scheduler_info()["workers"].items()}
    finally:
        for probe in probes.values():
            probe.unlink(missing_ok=True)
    for address, missing in sorted(unseen.items()):
        worker = address if str(names.get(address, address)) == address else f"{names[address]} ({address})"
        for flag, probe in probes.items():
            if str(probe) in missing:
                raise ConfigError(f"{flag} {local[flag]}: Dask worker {worker} does not see this folder as this machine "
                                  "does; mount it at the same path on every worker, or use a store URL (s3://, gs://)")


def _unseen_probes(probes: list[str], token: str) -> list[str]:
    """On a worker: the probes it cannot read, or whose content is not the client's."""
    import json

    unseen = []
    for probe in probes:
        try:
            seen = json.loads(Path(probe).read_text()) == token
        except (OSError, ValueError):
            seen = False
        if not seen:
            unseen.append(probe)
    return unseen


def at_epochs(trial: Trial, epochs: int, first: bool) -> Trial:
    """`trial` trained for `epochs` (a rung's budget); its download is the sweep's, done already.

    `--refresh train` retrains the first rung only: a later rung continues the rung before it, which
    a refreshed training would not do.
    """
    refresh = [stage for stage in trial.config.refresh if stage != "download" and (first or stage != "train")]
    return replace(trial, config=trial.config.model_copy(update={"epochs": epochs, "refresh": refresh}))


def on_cuda(trial: Trial) -> bool:
    """Whether the configuration trains on a CUDA GPU, which it then has to itself."""
    return device_type(trial.device) == "cuda"


def submit(runner: DaskTaskRunner, trial: Trial, mirror: str | None) -> PrefectFuture:
    """Submit one configuration's pipeline to the runner's cluster."""
    # A CUDA configuration asks Dask for a worker that offers a GPU (`dask worker --resources GPU=1`;
    # every worker of the local cluster, when the sweep trains on CUDA).
    with dask.annotate(resources={"GPU": 1}) if on_cuda(trial) else contextlib.nullcontext():
        return runner.submit(configuration, {"trial": trial, "mirror": mirror})


def outcome(trial: Trial, future: PrefectFuture) -> dict[str, Any]:
    """One configuration's line in sweep.json: its result, or the stage that failed and why."""
    future.wait()
    entry: dict[str, Any] = {"name": trial.name, "experiment": trial.config.experiment, "values": trial.values,
                             "epochs": trial.config.epochs, "run_dir": trial.config.run_dir}
    state = future.state
    if state.is_completed():
        result = future.result()
        if not storage.exists(storage.join(trial.config.run_dir, "metrics.json")):
            return entry | {"stages": result["stages"], "state": "Failed", "error": (
                f"configuration: its outputs are not in {trial.config.run_dir} as this machine sees it: the worker "
                "wrote them to a folder of its own; share the folder, or use a store URL")}
        return entry | {"stages": result["stages"], "state": "Completed", METRIC: result[METRIC],
                        REPORTED: result[REPORTED], "mean_ap": result["mean_ap"], "train_dir": result["train_dir"]}
    if state.is_final():
        error = state.result(raise_on_failure=False)
    else:  # the Dask worker running it was lost, so the task run never reached a final state
        error = future.wrapped_future.exception()
    reason = one_line(error) if isinstance(error, BaseException) else state.message or state.name
    return entry | {"stages": getattr(error, "stages", {}), "state": state.name if state.is_final() else "Crashed",
                    "error": reason if isinstance(error, ConfigurationFailed) else f"configuration: {reason}"}
