"""The PyTorch TensorBoard tutorial on Fashion-MNIST as one Prefect flow.

    python flows/fashion.py --mirror ../shared/data/fashion-mnist
    python flows/fashion.py --help
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args

from prefect import Task, flow

from tasks.checkpoint import checkpoint_task
from tasks.config import (
    BatchSize, CheckpointEvery, ConfigError, DataDir, Device, Epochs, Experiment, LearningRate, LogEvery, Mirror,
    Momentum, Optimizer, Refresh, RunConfig, RunsDir, Schedule, Seed, parse_config, resolve_device,
)
from tasks.data import download_task
from tasks.evaluate import evaluate_task
from tasks.graph import graph_task
from tasks.inspection import inspect_task
from tasks.lock import experiment_lock
from tasks.report import report_task
from tasks.train import Hyperparameters, train_task

DEFAULTS = RunConfig()
PRESETS: dict[str, dict[str, Any]] = {
    "tutorial": {},
    # For accuracy rather than the tutorial's numbers: the same Net reaches >= 0.90 on the CPU in minutes.
    "accurate": {"optimizer": "adam", "schedule": "onecycle", "batch_size": 64, "epochs": 15, "lr": 0.005},
}


class Stages:
    """Runs stage tasks one after another, applying --refresh and noting which came from cache."""

    def __init__(self, refresh: list[str]) -> None:
        self.refresh = set(refresh)
        self.states: dict[str, str] = {}

    def __call__(self, stage: Task, **inputs: Any) -> Any:
        state = stage(**inputs, refresh=stage.name in self.refresh, return_state=True)
        self.states[stage.name] = state.name
        return state.result()  # raises the stage's error, failing the flow run


@flow(name="fashion-mnist", log_prints=True, retries=1, retry_delay_seconds=5, persist_result=True)
def fashion(
    experiment: Experiment = DEFAULTS.experiment,
    runs_dir: RunsDir = DEFAULTS.runs_dir,
    data_dir: DataDir = DEFAULTS.data_dir,
    epochs: Epochs = DEFAULTS.epochs,
    batch_size: BatchSize = DEFAULTS.batch_size,
    lr: LearningRate = DEFAULTS.lr,
    momentum: Momentum = DEFAULTS.momentum,
    optimizer: Optimizer = DEFAULTS.optimizer,
    schedule: Schedule = DEFAULTS.schedule,
    log_every: LogEvery = DEFAULTS.log_every,
    checkpoint_every: CheckpointEvery = DEFAULTS.checkpoint_every,
    seed: Seed = DEFAULTS.seed,
    device: Device = DEFAULTS.device,
    mirror: Mirror = DEFAULTS.mirror,
    refresh: Refresh = DEFAULTS.refresh,
) -> dict[str, Any]:
    """Download, inspect, log the graph, train, checkpoint, evaluate and report; returns the test metrics."""
    config = parse_config(locals())
    resolved_device = resolve_device(config.device)
    run_dir = str(config.run_dir)
    with experiment_lock(config.run_dir):
        stage = Stages(config.refresh)
        dataset = stage(download_task, data_dir=config.data_dir, mirror=config.source)
        stage(inspect_task, dataset=dataset, run_dir=run_dir, seed=config.seed)
        stage(graph_task, run_dir=run_dir)
        training = stage(
            train_task, dataset=dataset, run_dir=run_dir, hyperparameters=hyperparameters(config),
            device=resolved_device, log_every=config.log_every, checkpoint_every=config.checkpoint_every,
        )
        model_file = stage(checkpoint_task, training=training)
        evaluation = stage(evaluate_task, model_file=model_file, dataset=dataset)
        return report_task(config, resolved_device, evaluation, stage.states)


def hyperparameters(config: RunConfig) -> Hyperparameters:
    """The weights-deciding subset of the parameters."""
    return Hyperparameters(**{field.name: getattr(config, field.name) for field in fields(Hyperparameters)})


def build_parser() -> argparse.ArgumentParser:
    """The command line: one option per RunConfig field, with its help text and default."""
    parser = argparse.ArgumentParser(
        prog="fashion.py", description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,  # only the options given reach RunConfig, over the preset
    )
    for name, field in RunConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        choices = get_args(field.annotation) if name in ("optimizer", "schedule") else None
        if name == "refresh":
            parser.add_argument(flag, nargs="?", const="all", type=lambda text: text.split(","), metavar="STAGES",
                                help=f"{field.description} Alone: all stages.")
        else:
            parser.add_argument(flag, choices=choices, help=f"{field.description} (default: {default})")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tutorial",
                        help="Starting values: 'tutorial' (the tutorial's settings) or 'accurate' (Adam, one-cycle, "
                             "batch 64, 15 epochs); options given explicitly win.")
    parser.add_argument("--serve", action="store_true", default=False,
                        help="Serve the flow on the schedule of prefect.yaml from this process instead of running it once.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    preset, serve = args.pop("preset"), args.pop("serve")
    try:
        config = parse_config(PRESETS[preset] | args)
        resolve_device(config.device)
    except ConfigError as error:
        print(f"fashion.py: error: {error}", file=sys.stderr)
        return 2
    if serve:
        from flows.schedule import serve_on_schedule

        serve_on_schedule(fashion, config.model_dump())
        return 0
    result = fashion(**config.model_dump())
    print(f"Test accuracy: {result['test_accuracy']:.4f}")
    print(f"Run directory: {result['run_dir']}")
    print(f"Open TensorBoard: tensorboard --logdir {result['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
