"""Prefect's temporary server for a command-line run, booted while the heavy imports run.

Without PREFECT_API_URL a flow run makes Prefect start a temporary local server and wait seconds for
it, after everything has been imported. `start_temporary_server()` starts the same server first thing
(this module, run as a child process), so that it boots on the other core while torch and Prefect
import; `temporary_server_settings()` then points the run at it. Where PREFECT_API_URL is set, the
server process stops before touching anything and the configured server is used.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

from tasks.child_process import child_arguments, start_child
from tasks.polling import wait_for

STARTUP_SECONDS = 60.0
GO_AHEAD = b"serve\n"
SERVER_SETTINGS = {
    # Those of Prefect's own temporary server (prefect.server.api.server.SubprocessASGIServer):
    # the API alone, no UI, background services off.
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
    # Nor does it register Prefect's block types in a new database (a second): a flow run does not
    # use them. Nor note them as registered, so `prefect server start` registers them when it first
    # serves that database.
    "PREFECT_SERVER_REGISTER_BLOCKS_ON_START": "0",
    "PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION": "0",
    # Nor does it run automations (their triggers and actions; starting them costs a third of a
    # second): a server that lives for one run is no place for them. They belong on a Prefect
    # server that stays up, which PREFECT_API_URL points runs at.
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "0",
}


class TemporaryServerError(RuntimeError):
    """Prefect's temporary server did not come up."""


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through an http_proxy
_server: subprocess.Popen | None = None
_url: str | None = None


def start_temporary_server() -> None:
    """Boot Prefect's temporary server in the background, unless the settings name a server to use.

    The server process starts importing first thing; it touches Prefect's database and serves only once
    this process, having read the settings, tells it to (on its stdin). Where PREFECT_API_URL is set it
    is stopped instead.
    """
    global _server, _url
    # Bound here and handed over, so that no other process can take the port while the server imports.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        server = start_child(__name__, str(listener.fileno()), env={**os.environ, **SERVER_SETTINGS},
                             stdin=subprocess.PIPE, pass_fds=(listener.fileno(),))
        port = listener.getsockname()[1]
    from prefect.settings import PREFECT_API_URL  # imports Prefect: a good half second, now overlapped

    if PREFECT_API_URL.value():
        server.terminate()  # the database waits for the go-ahead: nothing to undo
        server.wait()
        return
    try:
        server.stdin.write(GO_AHEAD)
        server.stdin.close()
    except BrokenPipeError:
        pass  # it has already exited: waiting for it to answer says so, with its status
    _server, _url = server, f"http://127.0.0.1:{port}/api"
    atexit.register(_stop)


@contextlib.contextmanager
def temporary_server_settings() -> Iterator[None]:
    """Within this block, Prefect uses the server from `start_temporary_server()`, once it answers.

    Flow-run heartbeats are off there: they serve a server's crashed-run detection, which a temporary
    server does not run, and stopping their thread costs up to a second at the end of every run.
    """
    if _server is None:
        yield
        return
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    _wait_until_healthy()
    with temporary_settings(updates={PREFECT_API_URL: _url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def _wait_until_healthy() -> None:
    def healthy() -> bool:
        if _server.poll() is not None:
            raise TemporaryServerError(f"Prefect's temporary server exited with status {_server.returncode} "
                                       "while starting (its output is above)")
        with _DIRECT.open(f"{_url}/health", timeout=1):
            return True

    try:
        wait_for(healthy, f"Prefect's temporary server answering at {_url}", STARTUP_SECONDS, interval=0.05)
    except TimeoutError as error:
        raise TemporaryServerError(str(error)) from None


def _stop() -> None:
    if _server is not None and _server.poll() is None:
        _server.terminate()
        try:
            _server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _server.kill()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve(listener: socket.socket) -> None:
    """In the server process: import and build Prefect's API app, then serve it on `listener` if the run says so."""
    import uvicorn
    from prefect.server.api.server import create_app

    app = create_app()  # as `uvicorn --factory prefect.server.api.server:create_app` builds it
    if sys.stdin.buffer.readline() != GO_AHEAD:
        return  # the run uses a configured server, or has already ended
    uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on")).run(sockets=[listener])


if __name__ == "__main__":
    _serve(socket.socket(fileno=int(child_arguments()[0])))
