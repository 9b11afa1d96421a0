"""Which failures a retry can mend, decided once here, and the one line that tells a user what failed.

Permanent: a wrong or missing dataset file, a bad parameter, a busy experiment, a missing device, and
the file-system errors no retry can change (no space left, a read-only or unwritable folder, a name
too long). Everything else is transient (the network, a mirror's 5xx, a helper process or a worker
that died): the stage tasks and the flow retry those, and a retried training resumes.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# What to do about each permanent file-system error.
ADVICE = {
    errno.ENOSPC: "free some space there and run again: the run resumes where it stopped",
    errno.EDQUOT: "free some of your quota there and run again: the run resumes where it stopped",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.EACCES: "make it writable for this user, or choose another folder",
    errno.EPERM: "make it writable for this user, or choose another folder",
    errno.ENAMETOOLONG: "choose a shorter --experiment",
}


class PermanentError(RuntimeError):
    """A failure that a retry cannot mend; its message is one line: what failed, where, and what to do."""


class TransientError(RuntimeError):
    """A failure that a retry may mend (the network, a helper process that died); its message is one line."""


class RunFailed(RuntimeError):
    """A flow run's failure as its one line; the original error is its __cause__."""


def is_permanent(error: BaseException) -> bool:
    """Whether retrying cannot mend `error`."""
    from fashion_pipeline.tasks.config import ConfigError  # noqa: PLC0415  (config's errors are permanent by this rule)

    if isinstance(error, RunFailed) and error.__cause__ is not None:
        return is_permanent(error.__cause__)
    return isinstance(error, (PermanentError, ConfigError)) or (isinstance(error, OSError) and error.errno in ADVICE)


def is_known(error: BaseException) -> bool:
    """Whether `error` is one of the failures this project anticipates, whose one line says all there is."""
    return is_permanent(error) or isinstance(error, (TransientError, RunFailed))


def flat(text: str) -> str:
    """`text` on one line: each run of whitespace, newlines included, as one space."""
    return " ".join(text.split())


def one_line(error: BaseException) -> str:
    """`error` as one line: what failed, on which file, what to do."""
    if isinstance(error, OSError) and error.errno in ADVICE:
        where = f": {os.fsdecode(error.filename)}" if error.filename else ""
        return f"{error.strerror}{where}: {ADVICE[error.errno]}"
    text = flat(str(error))
    return text if is_known(error) else f"{type(error).__name__}: {text}"


def exit_status(error: BaseException) -> int:
    """A command line's exit status for a failed run: 2 for a bad parameter (as argparse), 1 otherwise."""
    from fashion_pipeline.tasks.config import ConfigError  # noqa: PLC0415

    cause = error.__cause__ if isinstance(error, RunFailed) else error
    return 2 if isinstance(cause, ConfigError) else 1


# The project's commands, each with the script that is the same command: `fashion` is `python flows/fashion.py`.
COMMANDS = {"fashion.py": "fashion", "sweep.py": "fashion-sweep"}


def program_name(script: str = "fashion.py") -> str:
    """The command as the user typed it (`fashion`, `fashion-sweep`, `fashion.py`, `sweep.py`), when this
    process is one of them; else (a test calling a command's main) `script`."""
    typed = Path(sys.argv[0]).name
    return typed if typed in {*COMMANDS, *COMMANDS.values()} else script


def command_failed(program: str, error: BaseException) -> int:
    """Print a command's failure as its one line on stderr (Prefect's log above has the rest); its exit status."""
    print(f"{program}: error: {one_line(error)}", file=sys.stderr)
    return exit_status(error)


class Terminated(BaseException):
    """SIGTERM as an exception, as Ctrl-C is KeyboardInterrupt: the run ends in its one line, not at once."""

    signal = signal.SIGTERM


def _terminate(number: int, frame: Any) -> None:
    raise Terminated


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated. Prefect's flow engine, which turns SIGTERM into a
    crash of the flow run, sends the signal again to the handler it found: this one."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interruption(error: BaseException) -> int | None:
    """The signal that interrupted a run, for Ctrl-C (KeyboardInterrupt), Terminated and Prefect's
    TerminationSignal (its SIGTERM bridge); None for any other error."""
    if isinstance(error, KeyboardInterrupt):
        return signal.SIGINT
    number = getattr(error, "signal", None)  # prefect.exceptions.TerminationSignal, without importing Prefect
    return number if isinstance(number, int) else None


def command_interrupted(program: str, number: int, run_dirs: list[Path]) -> int:
    """Print an interrupted command's one line on stderr, naming the newest checkpoint that a rerun
    resumes from; its exit status, 128 + the signal's number, as a shell reports it."""
    from fashion_pipeline.tasks.plumbing import storage

    found = [path for run_dir in run_dirs for path in Path(run_dir).glob("train-*/checkpoints/step-*.pt")]
    # Newest first, by step; the first that a rerun would find (for a run in a store: one that reached it).
    newest = next((path for path in sorted(found, key=lambda path: path.name, reverse=True)
                   if storage.published(path)), None)
    kept = (f"the checkpoint at step {int(newest.stem.removeprefix('step-'))} is kept" if newest
            else "no training had reached its first checkpoint")
    print(f"{program}: interrupted by {signal.Signals(number).name}; {kept}, and the same command resumes",
          file=sys.stderr)
    return 128 + number


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """A task's `retry_condition_fn`: retry unless the failure is permanent."""
    try:
        state.result()
    except Exception as error:  # noqa: BLE001  (the task's own failure, to classify)
        return not is_permanent(error)
    return False


@contextmanager
def ending_the_run() -> Iterator[None]:
    """In a flow: any failure becomes RunFailed, whose message (the state's) is its one line.

    A permanent one also spends the flow run's own retries, so that it fails at once instead of
    running again to fail the same way.
    """
    try:
        yield
    except Exception as error:
        if is_permanent(error):
            _no_more_flow_retries()
        raise RunFailed(one_line(error)) from error


def _no_more_flow_retries() -> None:
    """Set this flow run's retries to 0 on the server, whose retry rule reads them when the run fails."""
    from prefect import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    run = context.flow_run
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(run.id, empirical_policy=run.empirical_policy.model_copy(update={"retries": 0}))
    except Exception as error:  # noqa: BLE001  (the run fails in its one line either way; a retry fails the same)
        logging.getLogger(__name__).warning("could not spend the flow run's retries: %s", one_line(error))


class KnownFailureTracebacks(logging.Filter):
    """For a terminal: no traceback for anticipated failures (their one line says it), at most one otherwise.

    Prefect logs a traceback for every failed attempt of a task and again for the flow; the API (and
    so the UI) keeps them all, and the terminal shows one line per attempt.
    """

    def __init__(self) -> None:
        super().__init__()
        self.shown = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            if is_known(record.exc_info[1]) or self.shown:
                record.exc_info, record.exc_text = None, None
            else:
                self.shown = True
        return True


def quiet_known_failures() -> None:
    """Add KnownFailureTracebacks to Prefect's console handlers; let threads die of known failures quietly;
    keep failures to ship logs to a lost server off the terminal.

    TensorBoard's writer thread, say, dies of a full disk with a traceback on stderr, and the writer
    then raises the same error in the thread that uses it, where it fails the stage in one line.
    """
    from prefect.logging.handlers import PrefectConsoleHandler

    known = KnownFailureTracebacks()
    for logger in (logging.getLogger("prefect"), logging.getLogger()):
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler):
                handler.addFilter(known)
    default_hook = threading.excepthook

    def thread_hook(arguments: threading.ExceptHookArgs) -> None:
        if arguments.exc_value is None or not is_known(arguments.exc_value):
            default_hook(arguments)

    threading.excepthook = thread_hook
    # Prefect ships logs to its server from a thread and, while logging.raiseExceptions is on (Python's
    # default, meant for development), prints "--- Error logging to API ---" with no line end each time
    # a lost server refuses them. The run's own warnings say when its server is lost, and what it does.
    logging.raiseExceptions = False
