"""The stages after the download, each fed by the one before: one chain for the single run and the sweep."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import Task

from tasks.checkpoint import checkpoint_task
from tasks.config import RunConfig
from tasks.devices import device_type
from tasks.evaluate import evaluate_task
from tasks.graph import graph_task
from tasks.inspection import inspect_task
from tasks.train import Hyperparameters, train_task

# Calls a stage task with its inputs (adding `refresh`) and returns what the next stages take: its
# result (flows/fashion.py runs them one after another) or its future (flows/sweep.py submits them).
StageCall = Callable[..., Any]


def for_run(task: Task, config: RunConfig, *tags: str) -> Task:
    """`task` as the Prefect UI should show it for this run: "train lr=0.01", "evaluate nightly"; with `tags`."""
    return task.with_options(task_run_name=f"{task.name} {config.run_dir.name}", tags={*task.tags, *tags})


def accelerator_tag(device: str) -> tuple[str, ...]:
    """The device-type tag of a training on an accelerator ("cuda", "mps"); none on the CPU."""
    kind = device_type(device)
    return () if kind == "cpu" else (kind,)


def run_stages(stage: StageCall, config: RunConfig, device: str, dataset: Any) -> dict[str, Any]:
    """Inspect, graph, train, checkpoint and evaluate one configuration on the downloaded `dataset`.

    Training on an accelerator is tagged with its device type ("cuda", "mps"), so that a tag
    concurrency limit (`prefect concurrency-limit create cuda 1`) keeps trainings from sharing a GPU.
    A CPU training has no such tag: every tag costs a task a concurrency-slot request to the server,
    which stalled cached reruns for seconds, and the CPU needs no limit.

    Returns what `stage` returned for each, by stage name.
    """
    run_dir = str(config.run_dir)
    done = {
        "inspect": stage(for_run(inspect_task, config), dataset=dataset, run_dir=run_dir, seed=config.seed),
        "graph": stage(for_run(graph_task, config), run_dir=run_dir),
        "train": stage(
            for_run(train_task, config, *accelerator_tag(device)), dataset=dataset, run_dir=run_dir,
            hyperparameters=Hyperparameters.of(config), device=device, log_every=config.log_every,
            checkpoint_every=config.checkpoint_every,
        ),
    }
    done["checkpoint"] = stage(for_run(checkpoint_task, config), training=done["train"])
    done["evaluate"] = stage(for_run(evaluate_task, config), model_file=done["checkpoint"], dataset=dataset)
    return done
