"""Helper processes of a run, such as Prefect's temporary server: modules of this project run as
`python -m MODULE PARENT_PID ARGS...`, which stop when the run's process dies, even by SIGKILL."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parents[1]
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def start_child(module: str, *args: str, env: Mapping[str, str] | None = None, **popen: Any) -> subprocess.Popen:
    """Start `module` of this project in a new Python process; `popen` goes to subprocess.Popen."""
    python_path = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, **(env or {}), "PYTHONPATH": python_path}
    return subprocess.Popen([sys.executable, "-m", module, str(os.getpid()), *args], env=environment, **popen)


def child_arguments() -> list[str]:
    """In a process from `start_child`: tie its life to its parent's, and return the arguments meant for it.

    On Linux it gets SIGTERM when the parent dies; where the parent is already gone, it exits at once.
    """
    parent, *arguments = sys.argv[1:]
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):
        sys.exit(0)
    return arguments
