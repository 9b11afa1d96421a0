"""The Dask cluster a sweep fans out on: an existing one, or a temporary one on this machine."""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from distributed import LocalCluster
from prefect import get_client
from prefect_dask import DaskTaskRunner

from fashion_pipeline.tasks.ml.devices import usable_cores

DASK_LOG_LEVEL = "DASK_DISTRIBUTED__LOGGING__DISTRIBUTED"  # Dask's setting: the level of its `distributed` loggers


def local_runner(workers: int | None = None, report: str | None = None, gpu: bool = False) -> DaskTaskRunner:
    """A temporary Dask cluster on this machine: `workers` processes (default: one per core), one task at a time each.

    The cores are shared out: each worker's trainings use cores // workers threads (Dask would
    otherwise pin each to one, through OMP_NUM_THREADS). With `gpu`, every worker offers this
    machine's GPU as the resource `GPU=1` that CUDA trainings ask for (flows/sweep.py). Its
    dashboard listens on a free port of 127.0.0.1 (the log gives its address), so that sweeps
    started side by side do not collide; `report` names a file for Dask's performance report.

    Processes rather than threads: training seeds the model's initial weights with torch.manual_seed,
    torch's process-wide generator, and sets torch's thread count for the process. Two trainings in
    threads of one process would interleave their draws from that generator and override each
    other's setting, so their weights would depend on timing; a process per running task keeps
    every configuration's result the same as a run of flows/fashion.py with its parameters on as
    many threads.
    """
    cores = usable_cores()
    workers = workers or cores
    return DaskTaskRunner(
        cluster_class=local_cluster,
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                        "dashboard_address": "127.0.0.1:0", "resources": {"GPU": 1} if gpu else None,
                        "env": {"OMP_NUM_THREADS": str(max(1, cores // workers))}},
        performance_report_path=report,
    )


def local_cluster(**options: Any) -> LocalCluster:
    """A LocalCluster whose workers report to this process's Prefect API, and whose own chatter stays quiet.

    Without PREFECT_API_URL, that is the local server of this Prefect home (tasks/plumbing/local_server.py);
    told its address, the workers use it instead of each starting a server of its own. Dask's
    scheduler, nannies and workers log only warnings and errors, not the start-up banners of every
    worker (and the traceback of a connection closed while the cluster shuts down), unless
    DASK_DISTRIBUTED__LOGGING__DISTRIBUTED asks for more.
    """
    api_url = get_client(sync_client=True).api_url
    # The workers read it as they start (they inherit this environment); the scheduler and the
    # nannies, in this process, have read Dask's settings already.
    level = os.environ.setdefault(DASK_LOG_LEVEL, "warning")
    logging.getLogger("distributed").setLevel(level.upper())
    return LocalCluster(**options | {"env": options.get("env", {}) | {"PREFECT_API_URL": str(api_url)}})


@dataclass(frozen=True)
class ClusterClass:
    """A cluster that a cluster manager starts for the sweep (dask-jobqueue, dask-kubernetes, ...)."""

    path: str  # its import path: "dask_jobqueue.SLURMCluster"
    kwargs: dict[str, Any] = field(default_factory=dict)  # given to it
    adapt: tuple[int, int] | None = None  # scale between this many workers (Dask's adaptive scaling)

    def check(self) -> None:
        """A ConfigError, in one line, unless the class imports and takes these keyword arguments."""
        from fashion_pipeline.tasks.config import ConfigError

        module, _, name = self.path.rpartition(".")
        try:
            cluster = getattr(importlib.import_module(module), name) if module else None
        except ImportError as error:
            raise ConfigError(f"--dask-cluster {self.path}: cannot import {module} ({error}); install the package "
                              "that provides it") from None
        except AttributeError:
            cluster = None
        if not callable(cluster):
            raise ConfigError(f"--dask-cluster {self.path}: no such class; give an import path such as "
                              "dask_jobqueue.SLURMCluster") from None
        try:
            inspect.signature(cluster).bind_partial(**self.kwargs)
        except TypeError as error:
            raise ConfigError(f"--dask-cluster-kwargs: {self.path} refuses them: {error}") from None
        if self.adapt and not 0 <= self.adapt[0] <= self.adapt[1]:
            raise ConfigError(f"--adapt {self.adapt[0]}:{self.adapt[1]}: give MIN:MAX with 0 <= MIN <= MAX")


def task_runner(dask_address: str | None, workers: int, report: str | None = None, gpu: bool = False,
                cluster: ClusterClass | None = None) -> DaskTaskRunner:
    """The existing Dask cluster at `dask_address`, else one that `cluster`'s class starts (and scales),
    else a local one of `workers` processes (offering this machine's GPU with `gpu`); `report` names a
    file for Dask's performance report."""
    if dask_address:
        return DaskTaskRunner(address=dask_address, performance_report_path=report)
    if cluster:
        adapt = {"minimum": cluster.adapt[0], "maximum": cluster.adapt[1]} if cluster.adapt else None
        return DaskTaskRunner(cluster_class=cluster.path, cluster_kwargs=cluster.kwargs, adapt_kwargs=adapt,
                              performance_report_path=report)
    return local_runner(workers, report, gpu)
