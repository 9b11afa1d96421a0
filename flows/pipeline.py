"""The stages after the download, each fed by the one before: one chain for the single run and the sweep."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tasks.checkpoint import checkpoint_task
from tasks.config import RunConfig
from tasks.evaluate import evaluate_task
from tasks.graph import graph_task
from tasks.inspection import inspect_task
from tasks.train import Hyperparameters, train_task

# Calls a stage task with its inputs (adding `refresh`) and returns what the next stages take: its
# result (flows/fashion.py runs them one after another) or its future (flows/sweep.py submits them).
StageCall = Callable[..., Any]


def run_stages(stage: StageCall, config: RunConfig, device: str, dataset: Any) -> dict[str, Any]:
    """Inspect, graph, train, checkpoint and evaluate one configuration on the downloaded `dataset`.

    Returns what `stage` returned for each, by stage name.
    """
    run_dir = str(config.run_dir)
    done = {
        "inspect": stage(inspect_task, dataset=dataset, run_dir=run_dir, seed=config.seed),
        "graph": stage(graph_task, run_dir=run_dir),
        "train": stage(
            train_task, dataset=dataset, run_dir=run_dir, hyperparameters=Hyperparameters.of(config), device=device,
            log_every=config.log_every, checkpoint_every=config.checkpoint_every,
        ),
    }
    done["checkpoint"] = stage(checkpoint_task, training=done["train"])
    done["evaluate"] = stage(evaluate_task, model_file=done["checkpoint"], dataset=dataset)
    return done

