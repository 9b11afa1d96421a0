"""The `fashion-sweep` command (and `python flows/sweep.py`): the sweep's own options, the flow's as base values.

Light to import: every configuration is checked before Prefect and Dask are imported, so a bad one
fails in a blink; the local Prefect server, where none runs yet, boots while they are.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from fashion_pipeline.flows.command_line import PRESETS, OneLineParser, add_run_options
from fashion_pipeline.tasks.config import ConfigError
from fashion_pipeline.tasks.plumbing import local_server
from fashion_pipeline.tasks.plumbing.failures import (
    command_failed, command_interrupted, interruption, program_name, sigterm_as_interrupt,
)
from fashion_pipeline.tasks.sweep.plan import VALIDATION_SIZE, plan_sweep

if TYPE_CHECKING:
    from fashion_pipeline.tasks.sweep.plan import Trial


# The sweep's own options; every other option is a base value.
SWEEP_OPTIONS = ("grid", "configurations", "name", "dask_address", "workers", "dask_cluster", "dask_cluster_kwargs",
                 "adapt", "halving", "dask_report")


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1 (got {text!r})")
    return int(text)


def bounds(text: str) -> list[int]:
    """An argparse type: MIN:MAX, two whole numbers."""
    low, colon, high = text.partition(":")
    if not (colon and low.isdigit() and high.isdigit()):
        raise argparse.ArgumentTypeError(f"expected MIN:MAX, e.g. 1:8 (got {text!r})")
    return [int(low), int(high)]


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
    """The sweep's own options, then the single run's (but --experiment and --serve) as base values."""
    parser = OneLineParser(
        prog=program_name("sweep.py"), allow_abbrev=False,
        description="The Fashion-MNIST pipeline once per configuration, in parallel on Dask; the best is named by "
                    "validation accuracy.",
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
    where.add_argument("--dask-cluster", metavar="CLASS",
                       help="A cluster class that starts the workers, by import path: dask_jobqueue.SLURMCluster, "
                            "dask_kubernetes.operator.KubeCluster, distributed.LocalCluster, ...")
    parser.add_argument("--dask-cluster-kwargs", type=json_value(dict), metavar="JSON",
                        help="Keyword arguments of --dask-cluster, e.g. '{\"cores\": 8, \"memory\": \"16GB\"}'.")
    parser.add_argument("--adapt", type=bounds, metavar="MIN:MAX",
                        help="Let --dask-cluster scale between MIN and MAX workers with the sweep's load.")
    parser.add_argument("--halving", type=positive, metavar="ETA",
                        help="Successive halving: every configuration trains for the first rung's epochs, the best "
                             "1/ETA by validation accuracy continue to the next, up to --epochs.")
    parser.add_argument("--dask-report", metavar="FILE",
                        help="Write Dask's performance report (an HTML page) of the sweep to FILE.")
    add_run_options(parser.add_argument_group(
        "base values", "The values every configuration starts from: the single run's options (the folders, the "
        "data source, --validation-size and --refresh are the whole sweep's)."), skip=("experiment",),
        defaults={"validation_size": VALIDATION_SIZE})
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `fashion-sweep` command (and `python flows/sweep.py`); the exit status."""
    options = vars(build_parser().parse_args(argv))
    preset = options.pop("preset")
    request = {key: options.pop(key) for key in SWEEP_OPTIONS} | {"base": PRESETS[preset] | options}
    try:
        trials, _ = plan_sweep(**{key: value for key, value in request.items() if key != "dask_report"})
    except ConfigError as error:
        print(f"{program_name('sweep.py')}: error: {error}", file=sys.stderr)
        return 2
    local_server.start()  # boots while the flow's heavy imports run
    return run(request, trials)


def run(request: dict[str, Any], trials: list[Trial]) -> int:
    """Run the sweep that `request` (the flow's parameters) asks for, its `trials` checked already,
    and print its outcome; the exit status."""
    from fashion_pipeline.flows.launch import recorded_run
    from fashion_pipeline.flows.sweep import SweepFailed, sweep  # the heavy imports, while the local server boots
    from fashion_pipeline.tasks.plumbing import storage
    from fashion_pipeline.tasks.sweep.results import METRIC, REPORTED

    program = program_name("sweep.py")
    try:
        with sigterm_as_interrupt():
            state, _ = recorded_run(lambda: sweep(**request, return_state=True))
            summary = state.result()
    except SweepFailed as error:
        print(f"{program}: {error}", file=sys.stderr)
        return 1
    except BaseException as error:  # every failure ends in its one line, and so does Ctrl-C or SIGTERM
        if (number := interruption(error)) is not None:
            return command_interrupted(program, number, [storage.local_path(trial.config.run_dir) for trial in trials])
        if not isinstance(error, Exception):
            raise
        return command_failed(program, error)
    best, sweep_dir = summary["best"], storage.join(summary["runs_dir"], request["name"])
    print(f"Best of {len(trials)} by validation accuracy: {best['name']} (validation accuracy {best[METRIC]:.4f}, "
          f"test accuracy {best[REPORTED]:.4f}, run directory {best['run_dir']})")
    print(f"Comparison: {storage.join(sweep_dir, 'sweep.json')}")
    print(f"Open TensorBoard: tensorboard --logdir {sweep_dir}")
    return 0


if __name__ == "__main__":  # `python flows/...py`, and python -m
    sys.exit(main())
