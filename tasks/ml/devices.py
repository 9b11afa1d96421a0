"""Which device a run trains on: `auto` resolved, a missing device refused, without importing torch where it can."""

from __future__ import annotations

import ctypes
import functools
import math
import os
import sys
from pathlib import Path

from fashion_pipeline.tasks.config import ConfigError


def device_type(device: str) -> str:
    """The kind of a device name: "cuda" for "cuda:1", "cpu" for "cpu"."""
    return device.partition(":")[0]


# Where Linux gives a container's CPU limit: cgroup v2's quota and period, and cgroup v1's.
CGROUP_V2_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA, CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def usable_cores() -> int:
    """The CPU cores this process may use: its affinity where the OS has one, capped by a container's CPU
    limit (a cgroup quota, as a Kubernetes pod's `limits.cpu` sets it; rounded up, at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(cores, math.ceil(limit))) if limit else cores


def cgroup_cpu_limit() -> float | None:
    """The CPUs a cgroup quota allows this process (1.5 for `150000 100000`), or None without a quota."""
    try:
        quota, _, period = CGROUP_V2_MAX.read_text().strip().partition(" ")
    except OSError:
        try:
            quota, period = CGROUP_V1_QUOTA.read_text().strip(), CGROUP_V1_PERIOD.read_text().strip()
        except OSError:
            return None
    try:
        allowed, length = int(quota), int(period or 100000)
    except ValueError:  # "max": no quota
        return None
    return allowed / length if allowed > 0 and length > 0 else None  # cgroup v1's -1: no quota


def cpu_threads(batch_size: int) -> int:
    """Threads for CPU work on batches of `batch_size`.

    One for tiny batches, which per-op overhead dominates and extra threads only slow; else every core
    this process may use (OMP_NUM_THREADS where set, as Dask sets it to 1 in each worker process).
    """
    if batch_size <= 16:
        return 1
    first = (os.environ.get("OMP_NUM_THREADS") or "").split(",")[0].strip()  # OpenMP allows "4,2"
    return int(first) if first.isdigit() and int(first) > 0 else usable_cores()


def resolve_device(requested: str) -> str:
    """Turn `auto` into the best device here, and refuse a device this machine lacks.

    A machine whose CUDA driver shows no device and that is not a Mac answers without importing torch
    (slow), so that a cached rerun on the CPU never imports it.
    """
    kind = device_type(requested)
    if kind == "cpu" or (kind in ("auto", "cuda") and not _cuda_driver_devices() and sys.platform != "darwin"):
        if kind == "cuda":
            raise ConfigError(f"--device {requested}: CUDA is not available on this machine")
        return "cpu"
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {requested}: CUDA is not available on this machine")
        index = int(requested.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: MPS is not available on this machine")
    return requested


@functools.cache
def _cuda_driver_devices() -> int:
    """CUDA devices the driver shows this process (CUDA_VISIBLE_DEVICES applied); 0 without a driver.

    torch sees no more devices than the driver does, so 0 here settles that CUDA is unavailable.
    """
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value
