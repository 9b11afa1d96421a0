"""A real `prefect server start` on a loopback port, with SQLite in a Prefect home of its own: what a
remote server is to a run. It can be killed and started again on the same port and database."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil

from fashion_pipeline.tasks.plumbing.polling import wait_for
from tests.helpers import REPO, free_port


class PrefectServer:
    """`prefect server start` in a Prefect home under `root`; `env` is for every process that uses it."""

    def __init__(self, root: Path, **settings: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.port = root, free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.log = root / "server.log"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(root / "home"),
            "PREFECT_API_URL": self.api_url,  # replaces any other server's address inherited from the tests
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "false",
            **settings,
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> PrefectServer:
        """Start it (again), and return once it answers."""
        with open(self.log, "ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=REPO, env=self.env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)

        def healthy() -> bool | None:
            assert self.process.poll() is None, f"the Prefect server exited:\n{self.tail()}"
            try:
                return httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200 or None
            except httpx.HTTPError:
                return None

        try:
            wait_for(healthy, "the Prefect server", 120, interval=0.5)
        except TimeoutError as error:
            raise AssertionError(f"{error}:\n{self.tail()}") from None
        return self

    def kill(self) -> None:
        """SIGKILL the server and every process of its session, as a crash of its machine would."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)

    def records(self, kind: str) -> list[dict]:
        """Every flow run or task run (`kind`) in its database."""
        response = httpx.post(f"{self.api_url}/{kind}/filter", json={}, timeout=30)
        response.raise_for_status()
        return response.json()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


def stop(process: subprocess.Popen) -> None:
    """Stop the process and every process below it (a worker starts each flow run in a session of its own):
    SIGTERM, then SIGKILL for those still there after 15 s."""
    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(family, timeout=15)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    process.wait(10)
