"""The project as a regular install: a wheel built from the clone, installed apart from it, runs the flow.

The tests run against the editable install (`pip install -e .`); this one checks what a wheel holds:
the import name `fashion_pipeline` and nothing generic, the `fashion` command, and the flow's stages
and helper processes importing from the installed copy alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY, tiny_args

pytestmark = pytest.mark.slow  # builds a wheel and runs the flow on a Prefect server


def test_a_wheel_installs_fashion_pipeline_and_runs_the_flow(prefect_api_url: str, synthetic_mirror: Path,
                                                            tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: building writes build/ beside the sources, which stay as they are
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True)
    for name in listed.stdout.splitlines():
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = (tmp_path / "dist").glob("fashion_pipeline-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {"fashion_pipeline"}
    assert "fashion_pipeline/tasks/stage.py" in names and "fashion_pipeline/tasks/ml/training_loop.py" in names

    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                                str(wheel)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]
    work = tmp_path / "work"  # neither the clone nor anything of it: what runs comes from `site`
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import fashion_pipeline.flows.fashion as f, fashion_pipeline.tasks.ml.model as m; "
                               "print(f.__file__); print(m.__file__)"],
        cwd=work, env=env, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr[-3000:]
    assert all(Path(line).is_relative_to(site) for line in where.stdout.split()), where.stdout

    done = subprocess.run(
        [str(site / "bin" / "fashion"), "--experiment", "wheel", "--runs-dir", "runs", "--data-dir", "data",
         "--mirror", str(synthetic_mirror), *tiny_args()],
        cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Test accuracy: " in done.stdout and "Traceback" not in done.stderr
    metrics = json.loads((work / "runs" / "wheel" / "metrics.json").read_text())
    assert metrics["parameters"]["epochs"] == TINY["epochs"]
    assert set(metrics["stages"]) == {"download", "inspect", "graph", "train", "checkpoint", "evaluate"}
