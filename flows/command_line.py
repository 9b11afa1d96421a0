"""The `fashion` command (and `python flows/fashion.py`): argparse over RunConfig's fields, and presets.

Light to import: a bad option fails in a blink, and the local Prefect server, where none runs yet,
boots while the flow's heavy imports run.
"""

from __future__ import annotations

import argparse
import gc
import sys
from dataclasses import dataclass
from typing import Any, NoReturn, get_args

from fashion_pipeline.tasks.config import ConfigError, RunConfig, parse_config
from fashion_pipeline.tasks.ml.devices import resolve_device
from fashion_pipeline.tasks.plumbing.failures import (
    command_failed, command_interrupted, interruption, program_name, sigterm_as_interrupt,
)

PRESETS: dict[str, dict[str, Any]] = {
    "tutorial": {},
    # For accuracy rather than the tutorial's numbers: the same Net, in about a minute on a 2-core CPU.
    # Chosen on a validation split (bench/preset.py; docs/performance.md has the figures).
    "accurate": {"optimizer": "sgd", "schedule": "onecycle", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                 "batch_size": 64, "epochs": 15, "augment": True, "augment_shift": 0, "test_time_flip": True},
}


@dataclass(frozen=True)
class Command:
    """What the command line asks for: a validated configuration, run once or served on a schedule."""

    config: RunConfig
    serve: bool


class OneLineParser(argparse.ArgumentParser):
    """argparse, whose errors are one line like every other error of the commands (no usage block above)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def add_run_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, skip: tuple[str, ...] = (),
                    defaults: dict[str, Any] | None = None) -> None:
    """One option per RunConfig field (but `skip`), with its help text and default (or the one in
    `defaults`, where the command has its own), plus --preset.

    An option not given is absent from the parsed values: only those given reach RunConfig, over the preset.
    """
    for name, field in RunConfig.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        default = (defaults or {}).get(name, field.get_default(call_default_factory=True))
        if name == "refresh":
            parser.add_argument(flag, nargs="?", const="all", metavar="STAGES", default=argparse.SUPPRESS,
                                type=lambda text: [stage.strip() for stage in text.split(",") if stage.strip()],
                                help=f"{field.description} Alone: all stages.")
        elif field.annotation is bool:
            parser.add_argument(flag, nargs="?", const="true", metavar="BOOL", default=argparse.SUPPRESS,
                                help=f"{field.description} Alone: on. (default: {'on' if default else 'off'})")
        else:
            choices = get_args(field.annotation) if name in ("optimizer", "schedule") else None
            shown = "" if default is None else f" (default: {default})"  # None: the description says what is used instead
            parser.add_argument(flag, choices=choices, default=argparse.SUPPRESS, help=f"{field.description}{shown}")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tutorial",
                        help="Starting values: 'tutorial' (the tutorial's settings) or 'accurate' (SGD with weight decay, "
                             "one-cycle, batch 64, 15 epochs, flipped images and the test-time flip); options given "
                             "explicitly win.")


def build_parser() -> argparse.ArgumentParser:
    """The command's options: one per RunConfig field, --preset, and --serve."""
    parser = OneLineParser(prog=program_name("fashion.py"),
                           description="The PyTorch TensorBoard tutorial on Fashion-MNIST as one Prefect flow.")
    add_run_options(parser)
    parser.add_argument("--serve", action="store_true", default=False,
                        help="Serve the flow on the schedule of prefect.yaml from this process instead of running it once.")
    return parser


def parse_command_line(argv: list[str]) -> Command:
    """Parse and validate `argv`; a bad value prints one line and exits with status 2."""
    options = vars(build_parser().parse_args(argv))
    preset, serve = options.pop("preset"), options.pop("serve")
    try:
        return Command(parse_config(PRESETS[preset] | options), serve)
    except ConfigError as error:
        fail(error)


def fail(error: ConfigError) -> NoReturn:
    """Print a parameter error as one line and exit with status 2, as argparse does."""
    print(f"{program_name('fashion.py')}: error: {error}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    """Run the flow once, or serve it, as `argv` (default: the process's arguments) asks; the exit status."""
    command = parse_command_line(sys.argv[1:] if argv is None else argv)
    try:
        resolve_device(command.config.device)
    except ConfigError as error:
        fail(error)
    if not command.serve:
        from fashion_pipeline.tasks.plumbing import local_server

        local_server.start()
    status = run(command)
    # Everything is written and closed. Frozen, the objects torch and Prefect made are left to the
    # operating system instead of a last garbage collection over all of them, which would walk them all.
    gc.freeze()
    return status


def import_ahead(config: RunConfig) -> None:
    """Import now, while the local Prefect server may still be booting, what the run would import later."""
    import fastapi.encoders  # noqa: F401  (Prefect serialises a flow run's parameters with it)
    import prefect.flow_engine  # noqa: F401  (a flow run's first call imports Prefect's engines)
    import prefect.task_engine  # noqa: F401

    from fashion_pipeline.tasks.plumbing.storage import local_path

    if not (local_path(config.run_dir) / "metrics.json").is_file():  # a new or unfinished experiment, or a new machine
        import torch._dynamo  # noqa: F401  (torch's optimizers import it when first built)
        import torchvision.datasets  # noqa: F401  (download and inspection use torchvision)


def run(command: Command) -> int:
    """Run the flow once (or serve it) as the command line asks.

    A failed run ends with one line on stderr; the exit status is 2 for a bad parameter, 1 otherwise.
    """
    from fashion_pipeline.flows.fashion import fashion  # the heavy imports, while the local server boots
    from fashion_pipeline.flows.launch import recorded_run
    from fashion_pipeline.tasks.plumbing.lock import experiment_lock
    from fashion_pipeline.tasks.plumbing.storage import local_path

    program = program_name("fashion.py")
    if command.serve:
        from prefect.settings import PREFECT_API_URL

        from fashion_pipeline.flows.deployment import serve_on_schedule

        if not PREFECT_API_URL.value():
            fail(ConfigError("--serve needs a Prefect server to schedule on: start one (prefect server start) "
                             "and set PREFECT_API_URL"))
        try:
            serve_on_schedule(fashion, command.config.model_dump())
        except Exception as error:  # noqa: BLE001  (the server unreachable, prefect.yaml missing: one line)
            return command_failed(program, error)
        return 0
    try:
        # Taken here as well as in the flow, so that a busy experiment is refused before anything starts.
        with sigterm_as_interrupt(), experiment_lock(command.config.run_dir):
            import_ahead(command.config)
            state, server = recorded_run(lambda: fashion(**command.config.model_dump(), return_state=True))
            result = state.result()
    except BaseException as error:  # every failure ends in its one line, and so does Ctrl-C or SIGTERM
        if (number := interruption(error)) is not None:
            return command_interrupted(program, number, [local_path(command.config.run_dir)])
        if not isinstance(error, Exception):
            raise
        return command_failed(program, error)
    print(f"Test accuracy: {result['test_accuracy']:.4f}")
    print(f"Run directory: {result['run_dir']}")
    print(f"Open TensorBoard: tensorboard --logdir {result['run_dir']}")
    if server:
        print(f"Prefect UI: {server.ui_url}/runs/flow-run/{state.state_details.flow_run_id} "
              f"(the local Prefect server; it stops after {server.idle_minutes} idle minutes)")
    return 0


if __name__ == "__main__":  # `python flows/...py`, and python -m
    sys.exit(main())
