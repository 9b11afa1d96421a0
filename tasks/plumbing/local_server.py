"""One local Prefect server per Prefect home, shared by every run and sweep, that stops itself when idle.

Without PREFECT_API_URL a Prefect flow run starts a temporary server of its own, on the home's one
SQLite database, and kills it when the run ends: concurrent runs then migrate the same new database
at once, and events still in flight are lost. Instead, `start()` finds the server already running
for this Prefect home, or starts it as a process of its own that outlives the run:

- Started once. The server takes `server.lock` in the Prefect home before it touches the database,
  so N runs started together create and migrate it once; the others find it running.
- Shared. Each run holds `server.lease` (shared) for as long as it lives; the server stops only when
  no run holds it and nothing has asked it anything for FASHION_SERVER_IDLE_SECONDS (900 by default),
  so the UI it serves keeps it up while someone looks. Both are flock(2) locks: the kernel drops
  them when a process dies, even by SIGKILL, so none outlives its holder.
- Quiet. It runs the services that record runs (events, task-run states, logs) and serves the UI;
  the rest are off unless the user's settings say otherwise (SERVICE_DEFAULTS). Its own output goes
  to `server.log` in the Prefect home, not into a run's terminal.

    python -m fashion_pipeline.tasks.plumbing.local_server status | start | stop

Prefect's server is started through `prefect.server.api.server.create_app`, the factory behind
`prefect server start`. That and the settings below are Prefect's internals: `incompatibility()`
checks them, and where they differ (another Prefect release) runs fall back to Prefect's own
temporary server, with a warning.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fashion_pipeline.tasks.plumbing.child_process import module_command
from fashion_pipeline.tasks.plumbing.failures import PermanentError
from fashion_pipeline.tasks.plumbing.flocks import lock, lock_within, try_lock, unlock
from fashion_pipeline.tasks.plumbing.polling import wait_for

TESTED_PREFECT = "3.9"  # the Prefect minor release whose internals this module uses; pinned in pyproject.toml
STARTUP_SECONDS = 120.0  # a new database on a slow machine takes tens of seconds to migrate
WATCH_SECONDS = 1.0  # how often a run checks that its local server still lives
IDLE_ENV, IDLE_DEFAULT = "FASHION_SERVER_IDLE_SECONDS", 900.0
STATE, START_LOCK, LEASE, ALIVE, LOG = "server.json", "server.lock", "server.lease", "server.alive", "server.log"
# Off on the local server unless set by the user (environment or profile). A server for local runs
# schedules no deployments and has no workers, so late runs, the foreman, repossession, pause
# expirations and cancellation clean-up have nothing to act on; automations (triggers) belong on a
# server that stays up; telemetry would only log errors offline. Block types are not registered (a
# second on a new database) nor noted as registered, so `prefect server start` still registers them.
SERVICE_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    "PREFECT_SERVER_REGISTER_BLOCKS_ON_START": "false",
    "PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false",
}
CREATE_APP_PARAMETERS = ("settings", "ephemeral", "webserver_only", "final", "ignore_cache")


class LocalServerError(PermanentError):
    """The local Prefect server cannot be used; the message says why and what to do, in one line."""


class IncompatibleServer(RuntimeError):
    """This Prefect's internals are not those the local server uses: Prefect's own temporary server is used."""


INCOMPATIBLE_STATUS = 78  # the server's exit status when it finds Prefect's internals changed (EX_CONFIG)


@dataclass(frozen=True)
class LocalServer:
    """A running local server: its API and its process."""

    url: str  # http://127.0.0.1:PORT/api
    pid: int
    idle_seconds: float  # how long it stays up once no run uses it and nobody looks
    prefect: str  # the Prefect version it runs

    @property
    def ui_url(self) -> str:
        return self.url.removesuffix("/api")

    @property
    def idle_minutes(self) -> int:
        return round(self.idle_seconds / 60)


_pending: tuple[Path, subprocess.Popen | None] | None = None  # the home, and the server this run started
_error: LocalServerError | None = None
_server: LocalServer | None = None
_leases: list[IO[str]] = []  # the lease, held open (and locked) for this process's lifetime


# --- the run's side -------------------------------------------------------------------------------


def start() -> None:
    """Make sure the local server of this Prefect home is running or starting; do not wait for it.

    Nothing happens where the settings name a server (PREFECT_API_URL), and where this Prefect's
    internals differ from the tested ones (Prefect's own temporary server is used, with a warning).
    """
    global _pending, _error
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return
    if not settings.server.ephemeral.enabled:
        _error = LocalServerError("no Prefect server to record the run: PREFECT_API_URL is not set and "
                                  "PREFECT_SERVER_EPHEMERAL_ENABLED is off; set one of them")
        return
    if problem := untested_release():
        _fall_back(problem)
        return
    home = Path(settings.home)
    try:
        home.mkdir(parents=True, exist_ok=True)
        _hold_lease(home)
        process = None if running(home) or _alive_lock_held(home) else _spawn(home)
        if process is not None:  # a new user's first seconds are this: say so, rather than look hung
            first = "" if (home / "prefect.db").exists() else " (its first start: creating its database)"
            print(f"Starting the local Prefect server of {home}{first}...", file=sys.stderr, flush=True)
    except (LocalServerError, OSError) as error:
        _error = error if isinstance(error, LocalServerError) else LocalServerError(
            f"cannot start the local Prefect server in {home}: {error.strerror or error}")
        return
    _pending = (home, process)


@contextlib.contextmanager
def local_server_settings() -> Iterator[LocalServer | None]:
    """Within this block, Prefect uses the server from `start()`, once it answers; yields it (None if none).

    Flow-run heartbeats are off there: they feed crashed-run detection, which the local server does
    not run, and stopping their thread delays the end of every run.
    """
    global _server
    if _error is not None:
        raise _error
    if _pending is None:
        yield None
        return
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    try:
        _server = _wait_until_running(*_pending)
    except IncompatibleServer as problem:
        _fall_back(str(problem))
        yield None
        return
    stop = threading.Event()
    watchdog = threading.Thread(target=_keep_serving, args=(_pending[0], _server, stop), name="local-server-watchdog",
                                daemon=True)
    watchdog.start()
    try:
        with temporary_settings(updates={PREFECT_API_URL: _server.url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield _server
    finally:
        stop.set()
        watchdog.join()


def _keep_serving(home: Path, server: LocalServer, stop: threading.Event) -> None:
    """While the run uses `server`: should its process die (killed, out of memory), start it again at
    the same address. The run's Prefect client retries a refused connection once it has connected,
    so its states and logs reach the new server (on the same database) and the run goes on."""
    from prefect.logging import get_logger

    port = int(server.url.rsplit(":", 1)[1].split("/")[0])
    while not stop.wait(WATCH_SECONDS):
        if _alive_lock_held(home):
            continue  # serving (a run holds the lease, so it never stops by itself meanwhile)
        get_logger("local_server").warning("The local Prefect server (pid %d) has stopped; starting it again at %s",
                                           server.pid, server.url)
        try:
            _wait_until_running(home, _spawn(home, port), port)
        except Exception as error:  # noqa: BLE001  (a port taken meanwhile, say: the next round tries again)
            get_logger("local_server").warning("The local Prefect server did not start again: %s", error)


def wait_until_recorded(flow_run_id: Any, timeout: float = 30.0) -> None:
    """Wait until the local server shows the flow run and all its task runs in a final state.

    Their last states reach the server as events, a moment after the run has ended; waiting for them
    here means that what the run leaves in Prefect's database is complete when it exits.
    """
    if _server is None:
        return
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterState, TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    unfinished = TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(
        any_=[StateType.PENDING, StateType.SCHEDULED, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING])))

    def done() -> bool:
        try:
            if not client.read_flow_run(flow_run_id).state.is_final():
                return False
            return not client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), task_run_filter=unfinished,
                limit=1)
        except Exception:  # noqa: BLE001  (a busy server: ask again)
            return False

    with get_client(sync_client=True) as client, contextlib.suppress(TimeoutError):
        wait_for(done, "the local Prefect server recording the run", timeout, interval=0.02)  # outputs are on disk


def untested_release() -> str | None:
    """Why this Prefect release is not the one this module was tested with, or None if it is (a quick check)."""
    import prefect

    if not prefect.__version__.startswith(TESTED_PREFECT + "."):
        return f"Prefect {prefect.__version__} is not the tested {TESTED_PREFECT} release"
    return None


def incompatibility() -> str | None:
    """Why this Prefect's internals are not those this module uses, or None if they are (the server checks)."""
    from prefect.settings import Settings

    if problem := untested_release():
        return problem
    try:
        from prefect.server.api.server import create_app
    except ImportError as error:
        return f"Prefect's server cannot be imported ({error})"
    if missing := [name for name in CREATE_APP_PARAMETERS if name not in inspect.signature(create_app).parameters]:
        return f"prefect.server.api.server.create_app has no parameter {', '.join(missing)}"
    known = set(Settings().to_environment_variables(exclude_unset=False))
    if unknown := sorted(set(SERVICE_DEFAULTS) - known):
        return f"Prefect has no setting {', '.join(unknown)}"
    return None


def _fall_back(problem: str) -> None:
    warnings.warn(f"{problem}; using Prefect's own temporary server for this run", stacklevel=3)


def running(home: Path) -> LocalServer | None:
    """The server of `home` if one is serving, else None (none, or one still starting).

    Whether a server lives is its lock's word, not an answer over HTTP, which a busy server may be
    slow to give: the server holds `server.alive` for its whole life, and writes server.json once it
    serves.
    """
    server = recorded(home)
    if server is None:
        return None
    import prefect

    if server.prefect != prefect.__version__:
        raise LocalServerError(f"the local Prefect server of {home} runs Prefect {server.prefect}, this is "
                               f"{prefect.__version__}: stop it (python -m fashion_pipeline.tasks.plumbing.local_server stop)")
    return server


def recorded(home: Path) -> LocalServer | None:
    """The server that server.json records, if it is alive; of whatever Prefect version."""
    if not _alive_lock_held(home):
        return None
    try:
        state = json.loads((home / STATE).read_text())
        return LocalServer(state["url"], state["pid"], state["idle_seconds"], state["prefect"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # starting: it writes server.json once it serves


def _alive_lock_held(home: Path) -> bool:
    """Whether a server process holds `home`'s `server.alive` lock (the kernel drops it when it dies)."""
    try:
        with open(home / ALIVE, "a+") as alive:
            if not try_lock(alive, shared=True):
                return True
    except OSError:
        return False
    return False


def _hold_lease(home: Path) -> None:
    """Hold the home's lease (shared) until this process exits: the server stays up while any run lives."""
    lease = open(home / LEASE, "a+")  # noqa: SIM115  (held open, and locked, for the process's lifetime)
    try:
        lock_within(lease, f"the local Prefect server of {home} to finish stopping", STARTUP_SECONDS, shared=True)
    except TimeoutError as error:
        raise LocalServerError(str(error)) from None
    _leases.append(lease)


def _spawn(home: Path, port: int = 0) -> subprocess.Popen:
    """Start a server process for `home`, in a session of its own so that it outlives this run; on
    `port` where it is free (0: any)."""
    from prefect.settings import get_current_settings

    chosen = get_current_settings().to_environment_variables(exclude_unset=True)  # the user's, from env or profile
    defaults = {name: value for name, value in SERVICE_DEFAULTS.items() if name not in chosen and name not in os.environ}
    with open(home / LOG, "ab") as log:
        # __spec__.name, not __name__: this module may be __main__ (python -m ... start)
        return subprocess.Popen(module_command(__spec__.name, "serve", str(home), str(port)),
                                env={**os.environ, **defaults, **chosen},
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=home)


def _wait_until_running(home: Path, process: subprocess.Popen | None, port: int = 0) -> LocalServer:
    """The server of `home` once it answers; `process` is the one this run started, if any (on `port`)."""

    def up() -> LocalServer | None:
        nonlocal process
        if server := running(home):
            return server
        if _alive_lock_held(home):
            return None  # a server is starting: wait for it
        if process is None or process.poll() == 0:
            # The server seen by start() has stopped since, or the one started found another that has.
            process = _spawn(home, port)
        elif process.returncode == INCOMPATIBLE_STATUS:
            raise IncompatibleServer((home / LOG).read_text().strip().splitlines()[-1])
        elif process.poll() is not None:
            raise LocalServerError(f"the local Prefect server exited with status {process.returncode} while "
                                   f"starting; its log: {home / LOG}")
        return None

    try:
        return wait_for(up, f"the local Prefect server of {home} answering", STARTUP_SECONDS, interval=0.05)
    except TimeoutError as error:
        raise LocalServerError(f"{error}; its log: {home / LOG}") from None


# --- the server's side ----------------------------------------------------------------------------


def serve(home: Path, port: int = 0) -> int:
    """Run the server of `home` until it has been idle for FASHION_SERVER_IDLE_SECONDS or is told to stop;
    on `port` where it is free (a restart keeps its runs' address), else on any."""
    idle_seconds = float(os.environ.get(IDLE_ENV) or IDLE_DEFAULT)
    start_lock = open(home / START_LOCK, "a+")  # noqa: SIM115
    lock(start_lock)  # one server starts at a time; the others find it running
    alive = open(home / ALIVE, "a+")  # noqa: SIM115  (locked for this process's whole life)
    if not try_lock(alive):
        return 0  # another server lives (serving, or stopping): runs use it, or start anew once it is gone
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say so, and without it every
    # reply on a kept-alive connection waits for a delayed ACK (tens of milliseconds a request).
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the killed server's connections linger
    try:
        listener.bind(("127.0.0.1", port))
    except OSError:
        listener.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/api"
    # Before Prefect reads its settings: what the UI in the browser talks to.
    os.environ.setdefault("PREFECT_SERVER_UI_API_URL", url)

    (home / STATE).unlink(missing_ok=True)  # a dead server's
    if problem := incompatibility():
        print(problem, flush=True)  # the last line of the log: the run's warning quotes it
        return INCOMPATIBLE_STATUS
    import prefect
    import uvicorn
    from prefect.server.api.server import create_app

    activity = Activity(create_app(final=True))
    server = uvicorn.Server(uvicorn.Config(activity, log_level="error", lifespan="on"))
    lease = open(home / LEASE, "a+")  # noqa: SIM115  (its lock, once idle, is held until the process exits)

    def watch() -> None:
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.05)
        _write_state(home, {"url": url, "pid": os.getpid(), "prefect": prefect.__version__,
                                  "idle_seconds": idle_seconds})
        unlock(start_lock)
        while not server.should_exit:
            time.sleep(1)
            if not (home / STATE).exists():  # the Prefect home was removed
                break
            if not try_lock(lease):
                activity.touch()  # a run is alive
                continue
            if time.monotonic() - activity.last < idle_seconds:
                unlock(lease)
                continue
            break  # idle: keep the lease (exclusive) until exit, so no run starts on a server that is stopping
        with contextlib.suppress(FileNotFoundError):
            (home / STATE).unlink()
        server.should_exit = True

    threading.Thread(target=watch, daemon=True).start()
    server.run(sockets=[listener])
    return 0


class Activity:
    """ASGI middleware: notes the time of the latest request, so that an idle server can tell it is idle."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            self.touch()
        await self.app(scope, receive, send)


def _write_state(home: Path, state: dict[str, Any]) -> None:
    from fashion_pipeline.tasks.plumbing.files import atomic_write_json

    atomic_write_json(home / STATE, state)


# --- the command line -----------------------------------------------------------------------------


def stop(home: Path, timeout: float = 30.0) -> str:
    """Stop the server of `home` once no run uses it; returns what happened, as a sentence."""
    server = recorded(home)  # of any Prefect version: stopping one after an upgrade is the point
    if server is None:
        return f"no local Prefect server runs for {home}"
    with open(home / LEASE, "a+") as lease:
        if not try_lock(lease):
            raise LocalServerError(f"runs are using the local Prefect server at {server.ui_url}; "
                                   "it stops by itself once they end and it has been idle")
        with contextlib.suppress(ProcessLookupError):  # it may have just stopped by itself
            os.kill(server.pid, signal.SIGTERM)
            try:
                wait_for(lambda: not _alive_lock_held(home), "the local Prefect server stopping", timeout,
                         interval=0.05)
            except TimeoutError:
                os.kill(server.pid, signal.SIGKILL)
    return f"stopped the local Prefect server at {server.ui_url}"


USAGE = """usage: python -m fashion_pipeline.tasks.plumbing.local_server [status | start | stop]

The local Prefect server that runs share when PREFECT_API_URL is not set, one per Prefect home:
  status  where it runs (its UI, pid and log), or that none runs (the default)
  start   start it, or say where it runs already
  stop    stop it; the next run starts it again"""


def main(argv: list[str]) -> int:
    """`status`, `start` or `stop` the local Prefect server of this Prefect home."""
    command = argv[0] if argv else "status"
    if command == "serve":  # the server process itself, started by `start()`
        return serve(Path(argv[1]), int(argv[2]) if len(argv) > 2 else 0)
    if command in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    from prefect.settings import get_current_settings

    home = Path(get_current_settings().home)
    try:
        if command == "stop":
            print(stop(home))
        elif command == "start":
            start()
            with local_server_settings() as server:
                if server:
                    print(f"the local Prefect server of {home}: {server.ui_url}")
                elif problem := untested_release():  # start() fell back, and warned
                    print(f"no local Prefect server started: {problem}")
                else:
                    print(f"a Prefect server is configured: {get_current_settings().api.url}")
        elif command == "status":
            server = recorded(home)
            print(f"the local Prefect server of {home}: {server.ui_url} (pid {server.pid}; log {home / LOG})"
                  if server else f"no local Prefect server runs for {home}")
        else:
            print(f"local_server: error: unknown command {command!r}; choose status, start or stop (see --help)", file=sys.stderr)
            return 2
    except LocalServerError as error:
        print(f"local_server: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
