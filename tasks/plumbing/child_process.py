"""Helper processes of a run (the figure process): modules of this project,
each run in a Python process of its own that stops when the run does.

Contract: call `start_child` from a thread that outlives the child. On Linux the child gets SIGTERM
when that thread ends (PR_SET_PDEATHSIG), so that no helper outlives a run killed by SIGKILL.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from typing import Any

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def module_command(module: str, *args: str) -> list[str]:
    """The command that runs `module` of this project as `__main__` of a new Python process, with `args`.

    -P: the current directory is not put first on the path, so nothing there can shadow a module.
    """
    return [sys.executable, "-P", "-m", module, *args]


def start_child(module: str, *args: str, **popen: Any) -> subprocess.Popen:
    """Start `module` of this project as a helper of this run; `popen` goes to subprocess.Popen.

    The child has a session of its own: a Ctrl-C in the terminal interrupts the run, which then stops
    its helpers in order, instead of interrupting every process at once.
    """
    return subprocess.Popen(module_command(module, str(os.getpid()), *args), start_new_session=True, **popen)


def child_arguments() -> list[str]:
    """In a process from `start_child`: tie its life to its parent's, and return the arguments meant for it.

    Where the parent is already gone, it exits at once.
    """
    parent, *arguments = sys.argv[1:]
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):
        sys.exit(0)
    return arguments
