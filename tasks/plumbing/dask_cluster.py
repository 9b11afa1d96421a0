"""The Dask cluster a sweep fans out on: an existing one, or a temporary one on this machine."""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from distributed import Client, LocalCluster, Nanny, WorkerPlugin
from prefect import get_client
from prefect_dask import DaskTaskRunner

from fashion_pipeline.tasks.ml.devices import usable_cores

DASK_LOG_LEVEL = "DASK_DISTRIBUTED__LOGGING__DISTRIBUTED"  # Dask's setting: the level of its `distributed` loggers
CLOSE_SECONDS = 60.0  # a local worker process's time to end by itself when the cluster closes


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
    return LocalCluster(**options | {"env": options.get("env", {}) | {"PREFECT_API_URL": str(api_url)}},
                        worker_class=PatientNanny)


class PatientNanny(Nanny):
    """A nanny that gives its worker process time to end by itself when the cluster closes.

    Dask's default, 4 s, is shorter than a busy machine needs to end a process that has trained
    with torch and reported to Prefect (its last events and logs are sent as it exits); the nanny
    would then kill it, with a warning at the end of every sweep.
    """

    async def close(self, timeout: float = CLOSE_SECONDS, reason: str = "nanny-close") -> str:
        return await super().close(timeout=timeout, reason=reason)


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


def check_scheduler(address: str, timeout: float = 5) -> None:
    """A ConfigError, before any run starts, unless something accepts connections at the scheduler's address.

    Dask itself would try for 30 s from inside the flow run and end in a traceback.
    """
    from distributed.comm.addressing import parse_address, parse_host_port

    from fashion_pipeline.tasks.config import ConfigError

    try:
        host, port = parse_host_port(parse_address(address)[1])
    except ValueError as error:
        raise ConfigError(f"--dask-address {address}: {error}") from None
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        raise ConfigError(f"--dask-address {address}: no Dask scheduler answers there ({error})") from None


def checked_cluster(dask_address: str | None = None, workers: int | None = None, dask_cluster: str | None = None,
                    dask_cluster_kwargs: dict[str, Any] | None = None,
                    adapt: tuple[int, int] | list[int] | None = None) -> ClusterClass | None:
    """Where a sweep runs, checked in one line before any work: the cluster class to start, if one is named.

    At most one of an existing scheduler's address, a local cluster's worker count and a cluster
    class; the class's keyword arguments and adaptive bounds only with the class.
    """
    from fashion_pipeline.tasks.config import ConfigError

    if sum(value is not None for value in (dask_address, workers, dask_cluster)) > 1:
        raise ConfigError("give at most one of --dask-address, --workers and --dask-cluster")
    if (dask_cluster_kwargs or adapt) and not dask_cluster:
        raise ConfigError("--dask-cluster-kwargs and --adapt are for --dask-cluster: name the cluster class")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers}: give a whole number of at least 1")
    if dask_address:
        check_scheduler(dask_address)
    if not dask_cluster:
        return None
    if adapt is not None and len(adapt) != 2:
        raise ConfigError(f"--adapt {adapt}: give MIN:MAX, two whole numbers")
    cluster = ClusterClass(dask_cluster, dask_cluster_kwargs or {}, tuple(adapt) if adapt else None)
    cluster.check()
    return cluster


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


class QuietSizeEstimates(WorkerPlugin):
    """Quiets Dask's warnings that a message is too deeply nested for its size estimate.

    A performance report gathers the workers' profiles, call trees deeper than the estimate goes:
    each worker would warn that it "defaults to -1 B", and sends the message whole all the same.
    """

    name = "fashion-quiet-size-estimates"

    def setup(self, worker: object) -> None:
        logging.getLogger("distributed.sizeof").setLevel(logging.ERROR)


def quiet_size_estimates(client: Client) -> None:
    """QuietSizeEstimates here and on every worker of `client`'s cluster, those it starts later included."""
    QuietSizeEstimates().setup(None)
    client.register_plugin(QuietSizeEstimates())
