"""A Fashion-MNIST mirror on 127.0.0.1: serves a folder, counts requests, can fail the first ones."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class MirrorHandler(SimpleHTTPRequestHandler):
    """Serves the folder; answers 503 to the first `failures` GET requests."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.gets[self.path] += 1  # type: ignore[attr-defined]
        if sum(self.server.gets.values()) <= self.server.failures:  # type: ignore[attr-defined]
            self.send_error(503, "mirror busy")
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:
        """Quiet: tests read the counts instead."""


@contextmanager
def serve_mirror(folder: Path, failures: int = 0) -> Iterator[tuple[str, Counter]]:
    """Serve `folder` at http://127.0.0.1:<free port>/; yields the URL and the GET count per path."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(MirrorHandler, directory=str(folder)))
    server.gets, server.failures = Counter(), failures  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", server.gets  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
