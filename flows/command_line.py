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
from fashion_pipeline.tasks.plumbing.failures import program_name

TAG = "fashion-mnist"  # on every flow run of this project: the command line's, the sweep's, the deployment's
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


def add_run_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, skip: tuple[str, ...] = ()) -> None:
    """One option per RunConfig field (but `skip`), with its help text and default, plus --preset.

    An option not given is absent from the parsed values: only those given reach RunConfig, over the preset.
    """
    for name, field in RunConfig.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
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
    from fashion_pipeline.flows.fashion import run

    status = run(command)
    # Everything is written and closed. Frozen, the objects torch and Prefect made are left to the
    # operating system instead of a last garbage collection over all of them, which would walk them all.
    gc.freeze()
    return status
