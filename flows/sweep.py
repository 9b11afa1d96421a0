"""Hyperparameter sweeps: the Fashion-MNIST pipeline once per configuration, fanned out on Dask.

    python flows/sweep.py --grid '{"lr": [0.001, 0.01], "batch_size": [4, 8]}' --runs-dir runs --mirror DIR
    python flows/sweep.py --configurations '[{"lr": 0.01}, {"optimizer": "adam"}]' --dask-address tcp://HOST:8786
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import socket
import sys
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import dask
from distributed import LocalCluster
from distributed.comm.addressing import parse_address, parse_host_port
from prefect import Task, flow, get_client, tags
from prefect.artifacts import create_table_artifact
from prefect.futures import PrefectFuture
from prefect_dask import DaskTaskRunner

from flows.command_line import PRESETS, TAG
from flows.command_line import build_parser as run_options
from flows.pipeline import for_run, run_stages
from tasks import local_server
from tasks.config import ConfigError, RunConfig, is_url, parse_config
from tasks.data import download_task
from tasks.devices import device_type, resolve_device
from tasks.failures import RunFailed, exit_status, one_line, quiet_known_failures
from tasks.files import atomic_write_json
from tasks.local_server import local_server_settings, wait_until_recorded
from tasks.lock import experiment_lock
from tasks.report import report_task

# One value, the sweep's, for all; configurations validated on different images could not be compared.
SHARED = ("experiment", "runs_dir", "data_dir", "mirror", "refresh", "validation_size")
VARIABLE = tuple(name for name in RunConfig.model_fields if name not in SHARED)  # what a configuration may set
# The best configuration is picked on held-out training images, never on the test set, whose accuracy
# (reported beside it) would otherwise be biased upward by the choice.
METRIC, REPORTED = "validation_accuracy", "test_accuracy"
VALIDATION_SIZE = 5000  # a sweep's default --validation-size


@dataclass(frozen=True)
class Trial:
    """One configuration of a sweep: its name, its varied values and its checked parameters."""

    name: str
    values: dict[str, Any]
    config: RunConfig
    device: str  # resolved: "cpu", "cuda:1", ...


class SweepFailed(RunFailed):
    """Some configurations of a sweep did not finish; sweep.json says which and why."""


def plan(name: str, base: dict[str, Any], grid: dict[str, list[Any]] | None = None,
         configurations: list[dict[str, Any]] | None = None, halving: int | None = None) -> list[Trial]:
    """Check every configuration of a sweep before any work; a bad one is a one-line ConfigError.

    Args:
        name: the sweep's folder under the runs dir; configuration runs are `<name>/<varied values>`.
        base: RunConfig values every configuration starts from (not `experiment`).
        grid: parameter -> list of values, expanded as a product, in the grid's key order.
        configurations: or a list of parameter overrides, one configuration each.
        halving: successive halving's ETA, or None; its rungs continue trainings, so every
            configuration must have the constant schedule and the same epochs.
    """
    if (grid is None) == (configurations is None):
        raise ConfigError("give either a grid or a list of configurations")
    if "experiment" in base:
        raise ConfigError("--experiment is set per configuration by the sweep; name the sweep with --name")
    base = shared_folders({"validation_size": VALIDATION_SIZE} | base, name)
    if not base["validation_size"]:
        raise ConfigError("--validation-size 0: a sweep picks its best configuration on held-out training images, "
                          f"never on the test set; give --validation-size N (default {VALIDATION_SIZE})")
    overrides = expand(grid) if grid is not None else configurations
    if not overrides:
        raise ConfigError("the sweep has no configurations")
    for override in overrides:
        if not isinstance(override, dict):
            raise ConfigError(f"configuration {override!r} is not an object of parameter values")
        if fixed := sorted(set(override) - set(VARIABLE)):
            raise ConfigError(f"configuration {_show(override)}: {', '.join(fixed)} cannot vary within a sweep; "
                              f"a configuration may set {', '.join(VARIABLE)}")
    checked = [_checked(base | override | {"experiment": name}, override) for override in overrides]
    given = list(dict.fromkeys(key for override in overrides for key in override))
    varied = [key for key in given if len({repr(getattr(config, key)) for config in checked}) > 1] or given
    trials, seen = [], {}
    for override, config in zip(overrides, checked):
        values = {key: getattr(config, key) for key in varied}
        label = ",".join(f"{key}={_slug(value)}" for key, value in values.items()) or "base"
        if label in seen:
            raise ConfigError(f"configurations {_show(seen[label])} and {_show(override)} are the same run ({label})")
        seen[label] = override
        config = _checked(base | override | {"experiment": f"{name}/{label}"}, override)
        try:
            device = resolve_device(config.device)
        except ConfigError as error:
            where = f"configuration {_show(override)}: " if "device" in override else ""
            raise ConfigError(f"{where}{error}") from None
        trials.append(Trial(label, values, config, device))
    if halving is not None:
        check_halving(trials, halving)
    return trials


def check_halving(trials: list[Trial], eta: int) -> None:
    """A ConfigError unless successive halving with `eta` can run these trials."""
    if eta < 2:
        raise ConfigError(f"--halving {eta}: keep 1 in ETA configurations per rung, ETA at least 2")
    if cycling := [trial for trial in trials if trial.config.schedule != "constant"]:
        raise ConfigError(f"--halving: {cycling[0].name} uses the {cycling[0].config.schedule} schedule, which "
                          "depends on the epoch count and so cannot continue to a larger budget; use --schedule constant")
    if len({trial.config.epochs for trial in trials}) > 1:
        raise ConfigError("--halving sets each rung's epochs: give every configuration the same --epochs")
    if len(rung_epochs(trials[0].config.epochs, eta)) < 2:
        raise ConfigError(f"--halving {eta} with --epochs {trials[0].config.epochs}: one rung only; "
                          f"give --epochs {eta} or more")


def rung_epochs(epochs: int, eta: int | None) -> list[int]:
    """Each rung's epochs, the last the full count: epochs 4, ETA 2 -> [1, 2, 4]; no halving -> [epochs]."""
    budgets = [epochs]
    while eta and budgets[0] // eta >= 1:
        budgets.insert(0, budgets[0] // eta)
    return budgets


def promote(entries: list[dict[str, Any]], eta: int) -> list[str]:
    """The names of the best 1/`eta` of a rung's completed configurations by validation accuracy (at least one)."""
    completed = [entry for entry in entries if entry["state"] == "Completed"]
    ranked = sorted(completed, key=lambda entry: -entry[METRIC])  # stable: the first of equals first
    return [entry["name"] for entry in ranked[: max(1, len(entries) // eta)]]


def shared_folders(base: dict[str, Any], name: str) -> dict[str, Any]:
    """`base` checked with the sweep's name, its folders (and a local mirror) made absolute.

    Workers elsewhere, or started in another folder, must find the same runs and data folders.
    """
    try:
        shared = parse_config(base | {"experiment": name})
    except ConfigError as error:
        raise ConfigError(str(error).replace("--experiment", "--name", 1)) from None
    folders = {"runs_dir": os.path.abspath(shared.runs_dir), "data_dir": os.path.abspath(shared.data_dir)}
    if shared.mirror and not is_url(shared.mirror):
        folders["mirror"] = os.path.abspath(shared.mirror)
    return base | folders


def expand(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the last parameter varying fastest."""
    if not isinstance(grid, dict) or not grid:
        raise ConfigError("the grid must be a non-empty object of parameter -> list of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid {key}: give a non-empty list of values (got {values!r})")
    return [dict(zip(grid, combination)) for combination in itertools.product(*grid.values())]


def _checked(values: dict[str, Any], override: dict[str, Any]) -> RunConfig:
    try:
        return parse_config(values)
    except ConfigError as error:
        raise ConfigError(f"configuration {_show(override)}: {error}") from None


def _show(override: dict[str, Any]) -> str:
    return json.dumps(override, default=str)


def _slug(value: Any) -> str:
    """A value as a safe path component: `0.01`, `adam`, `cuda_1`."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(value))


def local_runner(workers: int | None = None, report: str | None = None) -> DaskTaskRunner:
    """A temporary Dask cluster on this machine: `workers` processes (default: one per CPU core), one thread each.

    Its dashboard listens on a free port of 127.0.0.1 (the log gives its address), so that sweeps
    started side by side do not collide; `report` names a file for Dask's performance report.

    Processes rather than threads: training seeds the model's initial weights with torch.manual_seed,
    torch's process-wide generator, and sets torch's thread count for the process. Two trainings in
    threads of one process would interleave their draws from that generator and override each
    other's setting, so their weights would depend on timing; a process per running task keeps
    every configuration's result the same as a run of flows/fashion.py with its parameters.
    """
    return DaskTaskRunner(
        cluster_class=local_cluster,
        cluster_kwargs={"n_workers": workers or os.cpu_count() or 1, "threads_per_worker": 1, "processes": True,
                        "dashboard_address": "127.0.0.1:0"},
        performance_report_path=report,
    )


def local_cluster(**options: Any) -> LocalCluster:
    """A LocalCluster whose workers report to this process's Prefect API.

    Without PREFECT_API_URL, that is the local server of this Prefect home (tasks/local_server.py);
    told its address, the workers use it instead of each starting a server of its own.
    """
    api_url = get_client(sync_client=True).api_url
    return LocalCluster(**options, env={"PREFECT_API_URL": str(api_url)})


def check_scheduler(address: str, timeout: float = 5) -> None:
    """A ConfigError, before any run starts, unless something accepts connections at the scheduler's address.

    Dask itself would try for 30 s from inside the flow run and end in a traceback.
    """
    try:
        host, port = parse_host_port(parse_address(address)[1])
    except ValueError as error:
        raise ConfigError(f"--dask-address {address}: {error}") from None
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        raise ConfigError(f"--dask-address {address}: no Dask scheduler answers there ({error})") from None


def task_runner(dask_address: str | None, workers: int | None, report: str | None = None) -> DaskTaskRunner:
    """The existing Dask cluster at `dask_address`, else a local one; `report` names a file for Dask's
    performance report."""
    if dask_address:
        return DaskTaskRunner(address=dask_address, performance_report_path=report)
    return local_runner(workers, report)


@flow(name="fashion-mnist-sweep", flow_run_name="sweep {name}", log_prints=True, persist_result=True,
      task_runner=local_runner())
def sweep(
    name: str = "sweep",
    grid: dict[str, list[Any]] | None = None,
    configurations: list[dict[str, Any]] | None = None,
    base: dict[str, Any] | None = None,
    halving: int | None = None,
) -> dict[str, Any]:
    """Run the pipeline for every configuration in parallel, sharing one download; write the comparison.

    With `halving` (ETA), successive halving: every configuration trains for the first rung's epochs,
    the best 1/ETA by validation accuracy continue to the next rung, and so on up to the full epochs.

    Returns the content of `<runs-dir>/<name>/sweep.json`; raises SweepFailed, after writing it,
    when a configuration failed (its retries spent).
    """
    trials = plan(name, base or {}, grid, configurations, halving)
    shared = trials[0].config
    sweep_dir = Path(shared.runs_dir) / name
    refresh = set(shared.refresh)
    with ExitStack() as locks:
        for folder in (sweep_dir, *(trial.config.run_dir for trial in trials)):
            locks.enter_context(experiment_lock(folder))
        dataset = download_task.submit(data_dir=shared.data_dir, mirror=shared.source, refresh="download" in refresh)
        dataset.result()  # the one download, before fanning out; its failure fails the sweep
        latest: dict[str, dict[str, Any]] = {}  # each configuration's entry at the last rung it reached
        rungs, alive = [], trials
        for epochs in rung_epochs(shared.epochs, halving):
            rung = [replace(trial, config=trial.config.model_copy(update={"epochs": epochs})) for trial in alive]
            chains = [submit_stages(trial, dataset, refresh) for trial in rung]
            reports = [submit_report(trial, dataset, chain) for trial, chain in zip(rung, chains)]
            entries = [outcome(trial, dataset, chain, report) for trial, chain, report in zip(rung, chains, reports)]
            for entry in entries:
                print(describe(entry))
                latest[entry["name"]] = entry
            promoted = promote(entries, halving) if epochs < shared.epochs else []
            rungs.append({"epochs": epochs, "trained": [entry["name"] for entry in entries], "promoted": promoted,
                          METRIC: {entry["name"]: entry.get(METRIC) for entry in entries}})
            alive = [trial for trial in alive if trial.name in promoted]
        entries = [latest[trial.name] for trial in trials]
        summary = summarise(name, trials, entries) | ({"halving": halving, "rungs": rungs} if halving else {})
        atomic_write_json(sweep_dir / "sweep.json", summary)
        publish_table(name, entries)
    failed = [entry for entry in entries if entry["state"] != "Completed"]
    if failed:
        raise SweepFailed(f"{len(failed)} of {len(entries)} configurations failed ({failed[0]['name']}: "
                          f"{failed[0]['error']}); see {sweep_dir / 'sweep.json'}")
    return summary


def submit_stages(trial: Trial, dataset: PrefectFuture, refresh: set[str]) -> dict[str, PrefectFuture]:
    """Submit one configuration's stages, each fed by its upstream stage's future."""

    def submit(stage: Task, **inputs: Any) -> PrefectFuture:
        # A GPU training asks Dask for a worker that offers one (`dask worker --resources GPU=1`).
        gpu = stage.name == "train" and device_type(trial.device) == "cuda"
        with dask.annotate(resources={"GPU": 1}) if gpu else contextlib.nullcontext():
            return stage.submit(**inputs, refresh=stage.name in refresh)

    return run_stages(submit, trial.config, trial.device, dataset)


def submit_report(trial: Trial, dataset: PrefectFuture, chain: dict[str, PrefectFuture]) -> PrefectFuture | None:
    """Once the configuration's stages are done, submit its report (which records their states); None if one failed."""
    for future in chain.values():
        future.wait()
    if not all(future.state.is_completed() for future in chain.values()):
        return None
    return for_run(report_task, trial.config).submit(trial.config, trial.device, chain["evaluate"],
                                                     stage_states(dataset, chain))


def outcome(trial: Trial, dataset: PrefectFuture, chain: dict[str, PrefectFuture],
            report: PrefectFuture | None) -> dict[str, Any]:
    """One configuration's line in sweep.json: its result, or the first stage that failed and why."""
    futures = chain | ({"report": report} if report else {})
    for future in futures.values():
        future.wait()
    entry: dict[str, Any] = {
        "name": trial.name, "experiment": trial.config.experiment, "values": trial.values, "epochs": trial.config.epochs,
        "run_dir": str(trial.config.run_dir),
        "stages": stage_states(dataset, futures),
    }
    for stage, future in futures.items():
        if not future.state.is_completed():
            state = future.state.name if future.state.is_final() else "Crashed"
            return entry | {"state": state, "error": f"{stage}: {cause(future)}"}
    result = report.result()
    return entry | {"state": "Completed", METRIC: result[METRIC], REPORTED: result[REPORTED],
                    "mean_ap": result["mean_ap"], "train_dir": result["train_dir"]}


def stage_states(dataset: PrefectFuture, futures: dict[str, PrefectFuture]) -> dict[str, str]:
    """Each stage's Prefect state name ("Completed", "Cached", "Failed", ...), the shared download first."""
    return {"download": dataset.state.name} | {stage: future.state.name for stage, future in futures.items()}


def cause(future: PrefectFuture) -> str:
    """Why a stage did not complete, as one line: its exception's (tasks/failures.py), else its state's message."""
    state = future.state
    if state.is_final():
        error = state.result(raise_on_failure=False)
    else:  # the Dask worker running it was lost, so the task run never reached a final state
        error = future.wrapped_future.exception()
    if isinstance(error, BaseException):
        return one_line(error)
    return state.message or state.name


def describe(entry: dict[str, Any]) -> str:
    """A configuration's outcome as one log line."""
    if entry["state"] == "Completed":
        return (f"{entry['name']}: validation accuracy {entry[METRIC]:.4f}, test accuracy {entry[REPORTED]:.4f}, "
                f"mean AP {entry['mean_ap']:.4f}")
    return f"{entry['name']}: {entry['state']}, {entry['error']}"


def summarise(name: str, trials: list[Trial], entries: list[dict[str, Any]]) -> dict[str, Any]:
    """sweep.json: every configuration with its result or failure, and the best by validation accuracy."""
    completed = [entry for entry in entries if entry["state"] == "Completed"]
    full = max((entry.get("epochs", 0) for entry in completed), default=0)  # with halving: the last rung's
    best = max((entry for entry in completed if entry.get("epochs", 0) == full), key=lambda entry: entry[METRIC],
               default=None)  # the first of equals
    return {
        "name": name, "runs_dir": trials[0].config.runs_dir, "varied": list(trials[0].values), "metric": METRIC,
        "best": best, "completed": len(completed), "failed": len(entries) - len(completed), "configurations": entries,
    }


def publish_table(name: str, entries: list[dict[str, Any]]) -> None:
    """The comparison as a Prefect table artifact: one row per configuration."""
    rows = [entry["values"] | {"epochs": entry.get("epochs"), METRIC: entry.get(METRIC), REPORTED: entry.get(REPORTED),
                               "mean_ap": entry.get("mean_ap"), "state": entry["state"], "error": entry.get("error", "")}
            for entry in entries]
    key = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") + "-sweep"
    create_table_artifact(rows, key=key, description=f"Sweep {name}: one row per configuration")


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1 (got {text!r})")
    return int(text)


def json_value(kind: type) -> Any:
    """An argparse type: JSON text holding a `kind` (dict or list)."""

    def parse(text: str) -> Any:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from None
        if not isinstance(value, kind):
            raise argparse.ArgumentTypeError(f"expected a JSON {'object' if kind is dict else 'array'}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The sweep's own options; the rest are flows/fashion.py's, as base values."""
    parser = argparse.ArgumentParser(
        prog="sweep.py", description=__doc__.splitlines()[0], allow_abbrev=False,
        epilog="Every option of `python flows/fashion.py --help` except --experiment and --serve (--preset included) "
               "sets a base value that the configurations start from.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--grid", type=json_value(dict), metavar="JSON",
                        help='Parameter -> list of values; every combination runs, e.g. \'{"lr": [0.001, 0.01]}\'.')
    source.add_argument("--configurations", type=json_value(list), metavar="JSON",
                        help='A list of parameter overrides, one run each, e.g. \'[{"lr": 0.01}, {"optimizer": "adam"}]\'.')
    parser.add_argument("--name", default="sweep",
                        help="The sweep's folder under --runs-dir; each run is the experiment <name>/<varied values>. "
                             "(default: sweep)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--dask-address", metavar="tcp://HOST:PORT",
                       help="Run on this existing Dask scheduler instead of a temporary local cluster.")
    where.add_argument("--workers", type=positive, metavar="N",
                       help="Worker processes of the local cluster (default: one per CPU core, at most one per run).")
    parser.add_argument("--halving", type=positive, metavar="ETA",
                        help="Successive halving: every configuration trains for the first rung's epochs, the best "
                             "1/ETA by validation accuracy continue to the next, up to --epochs.")
    parser.add_argument("--dask-report", metavar="FILE",
                        help="Write Dask's performance report (an HTML page) of the sweep to FILE.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    base_parser = run_options()
    base_parser.prog = "sweep.py"
    base = vars(base_parser.parse_args(rest))
    preset, serve = base.pop("preset"), base.pop("serve")
    try:
        if serve:
            raise ConfigError("--serve is for flows/fashion.py; a sweep runs once")
        base = PRESETS[preset] | base
        trials = plan(args.name, base, args.grid, args.configurations, args.halving)
        if args.dask_address:
            check_scheduler(args.dask_address)
    except ConfigError as error:
        print(f"sweep.py: error: {error}", file=sys.stderr)
        return 2
    runner = task_runner(args.dask_address, args.workers or min(len(trials), os.cpu_count() or 1), args.dask_report)
    local_server.start()
    quiet_known_failures()
    try:
        with local_server_settings():
            with tags(TAG):
                state = sweep.with_options(task_runner=runner)(
                    name=args.name, grid=args.grid, configurations=args.configurations, base=base,
                    halving=args.halving, return_state=True,
                )
            wait_until_recorded(state.state_details.flow_run_id)
        summary = state.result()
    except SweepFailed as error:
        print(f"sweep.py: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001  (every failure ends in its one line; Prefect's log above has the rest)
        print(f"sweep.py: error: {one_line(error)}", file=sys.stderr)
        return exit_status(error)
    best = summary["best"]
    print(f"Best of {len(trials)} by validation accuracy: {best['name']} (validation accuracy {best[METRIC]:.4f}, "
          f"test accuracy {best[REPORTED]:.4f}, run directory {best['run_dir']})")
    print(f"Comparison: {Path(summary['runs_dir']) / args.name / 'sweep.json'}")
    print(f"Open TensorBoard: tensorboard --logdir {Path(summary['runs_dir']) / args.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
