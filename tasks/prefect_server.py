"""Boot Prefect's temporary server in the background, so that it starts while the heavy imports run."""

from __future__ import annotations

import threading

_starting: threading.Thread | None = None


def start_temporary_server() -> None:
    """Without PREFECT_API_URL a flow run starts a temporary local server (several seconds); start it now.

    Call `wait_for_temporary_server()` before running a flow.
    """
    global _starting
    _starting = threading.Thread(target=_start, name="prefect-temporary-server", daemon=True)
    _starting.start()


def wait_for_temporary_server() -> None:
    """Return once the server started by `start_temporary_server` answers (at once if none was started)."""
    if _starting is not None:
        _starting.join()


def _start() -> None:
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return  # a configured server: nothing to start
    from prefect.server.api.server import SubprocessASGIServer

    # The same instance Prefect's client asks for; once started, the flow run reuses it.
    SubprocessASGIServer().start()
