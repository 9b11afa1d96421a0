"""Progress of a long stage: a bar on a terminal, log lines elsewhere, and a Prefect progress artifact."""

from __future__ import annotations

import contextvars
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from fashion_pipeline.tasks.plumbing.log import prefect_run_context, stage_logger


class StepProgress:
    """Counts steps from `done` to `total`; reports at most every `every_seconds`, never per step."""

    def __init__(self, description: str, total: int, done: int = 0, every_seconds: float = 10.0) -> None:
        self.description, self.total, self.done = description, total, done
        self.every_seconds = every_seconds
        self.last_report = time.monotonic()
        self.bar = tqdm(total=total, initial=done, desc=description, unit="step", dynamic_ncols=True) if sys.stderr.isatty() else None
        self.facts: dict[str, float] = {}
        self.artifact_id = None
        self.sending: threading.Thread | None = None
        if prefect_run_context() is not None:  # in a Prefect run, the UI shows the progress too
            from prefect.artifacts import create_progress_artifact

            self.artifact_id = self._best_effort(create_progress_artifact, progress=self.percent(),
                                                 description=description)

    def percent(self) -> float:
        return 100.0 * self.done / max(self.total, 1)

    def note(self, **facts: float) -> None:
        """Facts (such as the latest window's loss) shown beside the count in the next report only: a
        report shows what is new since the last one, never a stale value again."""
        self.facts.update(facts)

    def advance(self, steps: int = 1) -> None:
        """Add `steps`; cheap enough to call on every step."""
        self.done += steps
        if self.bar is not None:
            self.bar.update(steps)
        now = time.monotonic()
        if now - self.last_report >= self.every_seconds or self.done >= self.total:
            self.last_report = now
            self.report()

    def report(self) -> None:
        shown = " ".join(f"{name} {value:.4f}" for name, value in self.facts.items())
        self.facts = {}
        if self.bar is not None:
            self.bar.set_postfix_str(shown, refresh=False)
        else:
            stage_logger().info("%s: %d/%d steps (%.0f%%)%s", self.description, self.done, self.total, self.percent(),
                                f" {shown}" if shown else "")
        if self.artifact_id is not None and not (self.sending and self.sending.is_alive()):
            from prefect.artifacts import update_progress_artifact

            # Sent beside the work, never in its way: a lost server holds an update for its client's
            # retries (a minute), and the next report, with a newer count, replaces an update still waiting.
            run = contextvars.copy_context().run  # the run's Prefect settings and context, in the sender's thread
            self.sending = threading.Thread(target=run, args=(self._best_effort, update_progress_artifact,
                                                              self.artifact_id), kwargs={"progress": self.percent()},
                                            name="progress-artifact", daemon=True)
            self.sending.start()

    def _best_effort(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`call`'s result; on any failure (the Prefect server unreachable, say) one warning, and no
        more progress artifact: progress is for people to look at, and never fails the stage."""
        try:
            return call(*args, **kwargs)
        except Exception as error:  # noqa: BLE001
            stage_logger().warning("The progress artifact is no longer updated: %s", " ".join(str(error).split()))
            self.artifact_id = None
            return None

    def close(self, timeout: float = 10.0) -> None:
        """Close the bar, and let the last update reach the server unless that takes longer than `timeout` s."""
        if self.bar is not None:
            self.bar.close()
        if self.sending is not None:
            self.sending.join(timeout)
