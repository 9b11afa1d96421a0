"""Waiting for something to come up: a server that answers, a run that finishes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], what: str, timeout: float, interval: float = 0.25) -> T:
    """Call `check` until it returns something truthy, and return that.

    An OSError from `check` (a server not listening yet, say) counts as "not yet"; any other error
    stops the wait. After `timeout` seconds, TimeoutError names `what`.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except OSError:  # urllib's URLError included
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)
