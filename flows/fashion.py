"""The PyTorch TensorBoard tutorial on Fashion-MNIST as one Prefect flow.

    python flows/fashion.py --mirror ../shared/data/fashion-mnist
    python flows/fashion.py --help
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # the same as the `fashion` command
    from fashion_pipeline.flows.command_line import main

    sys.exit(main())

from collections.abc import Callable
from typing import Any

from prefect import flow, tags
from prefect.client.schemas.objects import State

from fashion_pipeline.flows.command_line import TAG, Command, fail
from fashion_pipeline.tasks.config import (
    Augment, AugmentShift, BatchSize, CheckpointEvery, ConfigError, DataDir, Device, Epochs, Experiment,
    LabelSmoothing, LearningRate, LogEvery, Mirror, Momentum, Optimizer, Refresh, RunConfig, RunsDir, Schedule, Seed,
    TestTimeFlip, ValidationSize, WeightDecay, documented_parameters, parse_config,
)
from fashion_pipeline.tasks.ml.devices import resolve_device
from fashion_pipeline.tasks.plumbing.failures import (
    command_failed, command_interrupted, ending_the_run, interruption, program_name, quiet_known_failures,
    sigterm_as_interrupt,
)
from fashion_pipeline.tasks.plumbing.local_server import LocalServer, local_server_settings, wait_until_recorded
from fashion_pipeline.tasks.plumbing.lock import experiment_lock
from fashion_pipeline.tasks.plumbing.run_record import recorded_flow_run
from fashion_pipeline.tasks.plumbing.storage import local_path
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


def import_ahead(config: RunConfig) -> None:
    """Import now, while the local Prefect server may still be booting, what the run would import later."""
    import fastapi.encoders  # noqa: F401  (Prefect serialises a flow run's parameters with it)
    import prefect.flow_engine  # noqa: F401  (a flow run's first call imports Prefect's engines)
    import prefect.task_engine  # noqa: F401

    if not (local_path(config.run_dir) / "metrics.json").is_file():  # a new or unfinished experiment, or a new machine
        import torch._dynamo  # noqa: F401  (torch's optimizers import it when first built)
        import torchvision.datasets  # noqa: F401  (download and inspection use torchvision)


def recorded_run(start: Callable[[], State]) -> tuple[State, LocalServer | None]:
    """A flow run that `start` makes (returning its final state), tagged with TAG, on the configured
    Prefect server or else the local one (which is returned); once that server has recorded its end,
    so that the UI link printed next shows it finished."""
    quiet_known_failures()  # a known failure is its one line, printed after: no traceback in the log too
    with local_server_settings() as server:
        with tags(TAG):
            state = start()
        wait_until_recorded(state.state_details.flow_run_id)
    return state, server


def run(command: Command) -> int:
    """Run the flow once (or serve it) as the command line asks (flows/command_line.py).

    A failed run ends with one line on stderr; the exit status is 2 for a bad parameter, 1 otherwise.
    """
    if command.serve:
        from prefect.settings import PREFECT_API_URL

        from fashion_pipeline.flows.deployment import serve_on_schedule

        if not PREFECT_API_URL.value():
            fail(ConfigError("--serve needs a Prefect server to schedule on: start one (prefect server start) "
                             "and set PREFECT_API_URL"))
        try:
            serve_on_schedule(fashion, command.config.model_dump())
        except Exception as error:  # noqa: BLE001  (the server unreachable, prefect.yaml missing: one line)
            return command_failed(program_name("fashion.py"), error)
        return 0
    try:
        # Taken here as well as in the flow, so that a busy experiment is refused before anything starts.
        with sigterm_as_interrupt(), experiment_lock(command.config.run_dir):
            import_ahead(command.config)
            state, server = recorded_run(lambda: fashion(**command.config.model_dump(), return_state=True))
            result = state.result()
    except BaseException as error:  # every failure ends in its one line, and so does Ctrl-C or SIGTERM
        if (number := interruption(error)) is not None:
            return command_interrupted(program_name("fashion.py"), number, [local_path(command.config.run_dir)])
        if not isinstance(error, Exception):
            raise
        return command_failed(program_name("fashion.py"), error)
    print(f"Test accuracy: {result['test_accuracy']:.4f}")
    print(f"Run directory: {result['run_dir']}")
    print(f"Open TensorBoard: tensorboard --logdir {result['run_dir']}")
    if server:
        print(f"Prefect UI: {server.ui_url}/runs/flow-run/{state.state_details.flow_run_id} "
              f"(the local Prefect server; it stops after {server.idle_minutes} idle minutes)")
    return 0
