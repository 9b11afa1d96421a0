"""The pipeline: the seven stages in order, each fed by the one before.

One function, `run_pipeline`, for every run: flows/fashion.py calls it once, and flows/sweep.py once
per configuration, inside a Prefect task of its own on a Dask worker. The stages' task runs are
nested in that flow or task run.
"""

from __future__ import annotations

from inspect import signature
from pathlib import PurePosixPath
from typing import Any

from prefect import Task
from prefect.runtime import flow_run

from fashion_pipeline.tasks.checkpoint import checkpoint
from fashion_pipeline.tasks.config import RunConfig
from fashion_pipeline.tasks.download import download
from fashion_pipeline.tasks.evaluate import evaluate
from fashion_pipeline.tasks.graph import graph
from fashion_pipeline.tasks.inspect import inspect
from fashion_pipeline.tasks.ml.devices import device_type
from fashion_pipeline.tasks.ml.hyperparameters import Hyperparameters
from fashion_pipeline.tasks.plumbing import storage
from fashion_pipeline.tasks.report import report_task
from fashion_pipeline.tasks.train import train


class StageRunner:
    """Runs stage tasks one after another, applying --refresh and keeping each one's final state."""

    def __init__(self, refresh: list[str]) -> None:
        # A retried flow run resumes: what its first attempt refreshed is not thrown away again.
        self.refresh = set(refresh) if flow_run.run_count <= 1 else set()
        self.states: dict[str, str] = {}  # stage name -> "Completed", "Cached", "Failed", ...
        self.failed: str | None = None  # the stage that failed

    def __call__(self, stage: Task, **inputs: Any) -> Any:
        """Run `stage` on `inputs` (adding `refresh` where it takes one); its result, or its error raised."""
        if "refresh" in signature(stage.fn).parameters:
            inputs["refresh"] = stage.name in self.refresh
        state = stage(**inputs, return_state=True)
        self.states[stage.name] = state.name
        if not state.is_completed():
            self.failed = stage.name
        return state.result()  # raises the stage's error


def run_pipeline(config: RunConfig, device: str, mirror: str | None, run: StageRunner | None = None) -> dict[str, Any]:
    """Download, inspect, graph, train, checkpoint, evaluate and report one configuration; returns the report.

    Args:
        config: the run's parameters.
        device: the resolved device to train on.
        mirror: where the dataset comes from (None: the official mirrors).
        run: runs the stages and keeps their states (by default, a new StageRunner for `config`).
    """
    run = run or StageRunner(config.refresh)
    run_dir = config.run_dir
    dataset = run(in_store(download.task, config.data_dir), data_dir=config.data_dir, mirror=mirror)  # not for_run:
    # the dataset is shared by experiments
    run(for_run(inspect.task, config), dataset=dataset, run_dir=run_dir, seed=config.seed)
    run(for_run(graph.task, config), run_dir=run_dir)
    training = run(
        for_run(train.task, config, *accelerator_tag(device)), dataset=dataset, run_dir=run_dir,
        hyperparameters=Hyperparameters.of(config), device=device, log_every=config.log_every,
        checkpoint_every=config.checkpoint_every,
    )
    model_file = run(for_run(checkpoint.task, config), training=training)
    evaluation = run(for_run(evaluate.task, config), model_file=model_file, dataset=dataset)
    return run(for_run(report_task, config), config=config, device=device, evaluation=evaluation,
               stages=dict(run.states))


def for_run(task: Task, config: RunConfig, *tags: str) -> Task:
    """`task` as the Prefect UI should show it for this run: "train lr=0.01", "evaluate nightly"; with `tags`;
    its cache records beside the runs."""
    name = f"{task.name} {PurePosixPath(config.experiment).name}"
    return in_store(task, config.runs_dir).with_options(task_run_name=name, tags={*task.tags, *tags})


def in_store(task: Task, location: str) -> Task:
    """`task` keeping its cache records in the store of `location`, where that is a store, so that every
    machine finds a finished stage `Cached`; else in the Prefect home, as Prefect does by default."""
    records = storage.result_storage(location)
    return task if records is None else task.with_options(result_storage=records)


def accelerator_tag(device: str) -> tuple[str, ...]:
    """The device-type tag of a training on an accelerator ("cuda", "mps"); none on the CPU.

    So a tag concurrency limit (`prefect concurrency-limit create cuda 1`) keeps trainings from
    sharing a GPU. A CPU training has no such tag: every tag costs a task a concurrency-slot request
    to the server, which stalls cached reruns, and the CPU needs no limit.
    """
    kind = device_type(device)
    return () if kind == "cpu" else (kind,)
