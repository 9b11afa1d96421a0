"""Test-only fault injection: make a stage raise once, to exercise retries and resume.

Set env FASHION_FAULT to `stage` (raise when the stage starts) or `train:K` (raise before
training step K). Each fault fires once per process, so the retry that follows succeeds.
"""

from __future__ import annotations

import functools
import os

from fashion_pipeline.tasks.plumbing.failures import TransientError

FAULT_ENV = "FASHION_FAULT"
_fired: set[str] = set()


class InjectedFault(TransientError):
    """The failure asked for by FASHION_FAULT."""


def fault_point(stage: str, step: int | None = None) -> None:
    """Raise InjectedFault if FASHION_FAULT names this point and it has not fired in this process yet.

    Called on every training step: without FASHION_FAULT it costs one lookup.
    """
    wanted = _points(os.environ.get(FAULT_ENV, ""))
    if not wanted:
        return
    point = stage if step is None else f"{stage}:{step}"
    if point in wanted and point not in _fired:
        _fired.add(point)
        raise InjectedFault(f"injected fault at {point} (env {FAULT_ENV})")


@functools.cache
def _points(setting: str) -> frozenset[str]:
    """The points a FASHION_FAULT value names, parsed once per value."""
    return frozenset(name.strip() for name in setting.split(",") if name.strip())
