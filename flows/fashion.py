"""The PyTorch TensorBoard tutorial on Fashion-MNIST as one Prefect flow.

    python flows/fashion.py --mirror ../shared/data/fashion-mnist
    python flows/fashion.py --help
"""

from __future__ import annotations


if __name__ == "__main__":  # the same as the `fashion` command: this script runs its module, which exits
    import runpy

    runpy.run_module("fashion_pipeline.flows.command_line", run_name="__main__")

from typing import Any

from prefect import flow

from fashion_pipeline.tasks.config import (
    Augment, AugmentShift, BatchSize, CheckpointEvery, DataDir, Device, Epochs, Experiment,
    LabelSmoothing, LearningRate, LogEvery, Mirror, Momentum, Optimizer, Refresh, RunConfig, RunsDir, Schedule, Seed,
    TestTimeFlip, ValidationSize, WeightDecay, documented_parameters, parse_config,
)
from fashion_pipeline.tasks.ml.devices import resolve_device
from fashion_pipeline.tasks.plumbing.failures import ending_the_run
from fashion_pipeline.tasks.plumbing.lock import experiment_lock
from fashion_pipeline.tasks.plumbing.run_record import recorded_flow_run
from fashion_pipeline.tasks.pipeline import run_pipeline

MIRROR_VARIABLE = "fashion_mnist_mirror"
DEFAULTS = RunConfig.model_construct()  # the defaults, without checking the folders of the current directory


@flow(name="fashion-mnist", flow_run_name="{experiment}", log_prints=True, retries=1, retry_delay_seconds=5)
@documented_parameters
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
    validation_size: ValidationSize = DEFAULTS.validation_size,
    weight_decay: WeightDecay = DEFAULTS.weight_decay,
    augment: Augment = DEFAULTS.augment,
    augment_shift: AugmentShift = DEFAULTS.augment_shift,
    label_smoothing: LabelSmoothing = DEFAULTS.label_smoothing,
    test_time_flip: TestTimeFlip = DEFAULTS.test_time_flip,
    device: Device = DEFAULTS.device,
    mirror: Mirror = DEFAULTS.mirror,
    refresh: Refresh = DEFAULTS.refresh,
) -> dict[str, Any]:
    """Download, inspect, log the graph, train, checkpoint, evaluate and report; returns the test metrics."""
    parameters = locals()
    with ending_the_run():  # a failure is one line; a permanent one is not retried
        config = parse_config(parameters)
        resolved_device = resolve_device(config.device)
        with experiment_lock(config.run_dir), recorded_flow_run(config.run_dir):
            return run_pipeline(config, resolved_device, mirror_of(config))


def mirror_of(config: RunConfig) -> str | None:
    """The mirror a run downloads from: its own (--mirror or FASHION_MNIST_MIRROR), else the Prefect
    Variable `fashion_mnist_mirror`, set once on a server for all its runs; None for the official ones."""
    if config.source:
        return config.source
    from prefect.variables import Variable

    return Variable.get(MIRROR_VARIABLE, default=None) or None
