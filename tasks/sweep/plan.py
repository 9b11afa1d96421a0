"""A sweep's plan: every configuration checked, named and given its device before any work, and halving's rungs."""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fashion_pipeline.tasks.config import ConfigError, RunConfig, is_url, parse_config
from fashion_pipeline.tasks.ml.devices import resolve_device
from fashion_pipeline.tasks.plumbing import storage

if TYPE_CHECKING:
    from fashion_pipeline.tasks.plumbing.dask_cluster import ClusterClass

# One value, the sweep's, for all; configurations validated on different images could not be compared.
SHARED = ("experiment", "runs_dir", "data_dir", "mirror", "refresh", "validation_size")
VARIABLE = tuple(name for name in RunConfig.model_fields if name not in SHARED)  # what a configuration may set
VALIDATION_SIZE = 5000  # a sweep's default --validation-size


@dataclass(frozen=True)
class Trial:
    """One configuration of a sweep: its name, its varied values and its checked parameters."""

    name: str
    values: dict[str, Any]
    config: RunConfig
    device: str  # resolved ("cpu", "cuda:1", ...), or as asked where the workers resolve it


def plan(name: str, base: dict[str, Any], grid: dict[str, list[Any]] | None = None,
         configurations: list[dict[str, Any]] | None = None, halving: int | None = None,
         devices_here: bool = True) -> list[Trial]:
    """Check every configuration of a sweep before any work; a bad one is a one-line ConfigError.

    Args:
        name: the sweep's folder under the runs dir; configuration runs are `<name>/<varied values>`.
        base: RunConfig values every configuration starts from (not `experiment`).
        grid: parameter -> list of values, expanded as a product, in the grid's key order.
        configurations: or a list of parameter overrides, one configuration each.
        halving: successive halving's ETA, or None; its rungs continue trainings, so every
            configuration must have the constant schedule and the same epochs.
        devices_here: whether the configurations train on this machine, which then resolves and
            checks their devices; else each worker does, where it trains one (`Trial.device` as asked).
    """
    if (grid is None) == (configurations is None):
        raise ConfigError("give either a grid or a list of configurations")
    if "experiment" in base:
        raise ConfigError("--experiment is set per configuration by the sweep; name the sweep with --name")
    base = shared_values({"validation_size": VALIDATION_SIZE} | base, name)
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
            device = resolve_device(config.device) if devices_here else config.device
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


def shared_values(base: dict[str, Any], name: str) -> dict[str, Any]:
    """`base` checked with the sweep's name: its folders (and a local mirror) made absolute, its
    validation size parsed (the command line gives text).

    Workers elsewhere, or started in another folder, must find the same runs and data folders.
    """
    try:
        shared = parse_config(base | {"experiment": name})
    except ConfigError as error:
        raise ConfigError(str(error).replace("--experiment", "--name", 1)) from None
    parsed = {"runs_dir": _absolute(shared.runs_dir), "data_dir": _absolute(shared.data_dir),
              "validation_size": shared.validation_size}
    if shared.mirror and not is_url(shared.mirror):
        parsed["mirror"] = os.path.abspath(shared.mirror)
    return base | parsed


def _absolute(location: str) -> str:
    """A local folder as an absolute path; a store URL as it is."""
    return location if storage.is_remote(location) else os.path.abspath(location)


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


def plan_sweep(name: str, base: dict[str, Any], grid: dict[str, list[Any]] | None = None,
               configurations: list[dict[str, Any]] | None = None, halving: int | None = None,
               dask_address: str | None = None, workers: int | None = None, dask_cluster: str | None = None,
               dask_cluster_kwargs: dict[str, Any] | None = None,
               adapt: list[int] | tuple[int, int] | None = None) -> tuple[list[Trial], ClusterClass | None]:
    """A whole sweep checked before any work, each problem a one-line ConfigError: its configurations
    (`plan`), and where they run (tasks/plumbing/dask_cluster.py's `checked_cluster`), with the cluster
    class to start if one is named. The arguments are the sweep flow's parameters."""
    # On a cluster of other machines, the devices are theirs: each worker checks its own.
    trials = plan(name, base, grid, configurations, halving, devices_here=not (dask_address or dask_cluster))
    if not (dask_address or workers or dask_cluster or dask_cluster_kwargs or adapt):
        return trials, None
    from fashion_pipeline.tasks.plumbing.dask_cluster import checked_cluster  # Dask's imports, only when asked for

    return trials, checked_cluster(dask_address, workers, dask_cluster, dask_cluster_kwargs, adapt)
